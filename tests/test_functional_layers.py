"""Functional layers on module-owned parameters, and the ops of issue 13 that used to refuse.

Each rule is checked twice: the pipeline's own verification (slimmed == masked graph) and the
independent oracle of ``tests/_oracle.py`` (the eager original masked from the report alone),
plus ``check_params_sliced`` (every kept parameter is the original one at the kept indices).
Each test also asserts that the op's own channels were pruned (or, for a pin, that they were
pinned and reported), so a rule that silently pinned everything would fail.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
from _oracle import check_params_sliced, masked_and_slimmed, one_thread, randomize  # noqa: F401
from oba_fx.ops import Curvature, rule_for_function


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ------------------------------------------------------------------ functional layers (timm style)
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm subclass calling ``F.batch_norm`` with its own tensors, then an act."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean if not self.training else None,
                         self.running_var if not self.training else None, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return F.relu(x)


class RawConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RawConv1d(nn.Conv1d):
    def forward(self, x):
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RawConv3d(nn.Conv3d):
    def forward(self, x):
        return torch.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RawGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class RawInstanceNorm(nn.InstanceNorm2d):
    def forward(self, x):
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)


def _check(model, x, pruned=(), **kw):
    """Prune at 50 %, compare with both references, and require ``pruned`` params to lose entries."""
    model = randomize(model.eval())
    kw.setdefault("channel_ratio", 0.5)
    kw.setdefault("keep_residual", False)  # the toy blocks add what two layers write
    if isinstance(model, (Stem, NormNet)):  # the head's inputs stay, so the ranking reaches the op under test
        kw.setdefault("ignore", ("head",))
    r = masked_and_slimmed(model, x, **kw)
    assert r["err"] <= 1e-5, f"slimmed != independently masked original: {r['err']:.3g}"
    assert r["effect"] > 1e-3, "the masking changed nothing: the comparison would be vacuous"
    check_params_sliced(model, r["compiled"], r["report"]["kept"])
    for name in pruned:
        assert name in r["report"]["kept"], f"{name} was not pruned; kept: {sorted(r['report']['kept'])}"
    return r


class BNActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y)) + y
        return self.head(y.mean((2, 3)))


def test_functional_batch_norm_on_module_params_prunes_and_slices_running_stats():
    r = _check(BNActNet(), torch.randn(2, 3, 8, 8), pruned=("bn1.weight", "bn1.bias", "conv1.weight"))
    bn = r["compiled"].get_submodule("bn1")
    assert bn.running_mean.shape == bn.weight.shape == bn.running_var.shape
    assert bn.weight.numel() < 8 and not r["report"]["barriers"]


def test_functional_batch_norm_curvature_follows_its_statistics():
    rule = rule_for_function(F.batch_norm)
    gm = torch.fx.symbolic_trace(BNActNet().eval())
    node = next(n for n in gm.graph.nodes if n.target is F.batch_norm)
    assert rule.curvature_for(gm, node) == Curvature.LAYER
    gm_train = torch.fx.symbolic_trace(BNActNet().train())
    node = next(n for n in gm_train.graph.nodes if n.target is F.batch_norm)
    assert rule.curvature_for(gm_train, node) == Curvature.SMOOTH_LAYER


class ConvNet(nn.Module):
    def __init__(self, conv, dims, groups=1):
        super().__init__()
        k = (3,) * dims
        self.a = conv(3, 8, k, padding=1)
        self.b = conv(8, 8, k, padding=1, groups=groups)
        self.c = conv(8, 6, (1,) * dims)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.head(F.relu(self.c(y)).flatten(2).mean(2))


@pytest.mark.parametrize("conv,dims", [(RawConv1d, 1), (RawConv, 2), (RawConv3d, 3)])
def test_functional_conv_on_module_params(conv, dims):
    x = torch.randn(2, 3, *([5] * dims))
    r = _check(ConvNet(conv, dims), x, pruned=("a.weight", "a.bias", "b.weight", "c.weight"))
    assert not r["report"]["barriers"]
    before, after = r["report"]["flops_before"], r["report"]["flops_after"]
    assert after < before


def test_functional_grouped_conv_removes_whole_groups_and_rewrites_groups():
    r = _check(ConvNet(RawConv, 2, groups=4), torch.randn(2, 3, 6, 6), pruned=("b.weight",), ignore=("head",))
    kept = r["report"]["kept"]["b.weight"][0]
    assert len(kept) % 2 == 0 and all(kept[i] // 2 == kept[i + 1] // 2 for i in range(0, len(kept), 2))
    node = next(n for n in r["compiled"].graph.nodes if n.target is torch.conv2d and "b" in str(n.args[1]))
    assert node.args[6] == len(kept) // 2


class NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.norm, self.c = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(F.relu(self.c(F.relu(self.norm(self.a(x))))).mean((2, 3)))


def test_functional_group_norm_removes_whole_groups():
    r = _check(NormNet(RawGroupNorm(4, 8)), torch.randn(2, 3, 6, 6), pruned=("norm.weight", "a.weight"))
    kept = r["report"]["kept"]["norm.weight"][0]
    assert len(kept) % 2 == 0 and all(kept[i] // 2 == kept[i + 1] // 2 for i in range(0, len(kept), 2))
    assert r["compiled"].get_submodule("norm").weight.numel() == len(kept)


def test_functional_instance_norm():
    _check(NormNet(RawInstanceNorm(8, affine=True)), torch.randn(2, 3, 6, 6), pruned=("norm.weight", "a.weight"))


# ------------------------------------------------------------------ shape and elementwise ops
class Stem(nn.Module):
    """``a`` and ``a2`` write 8 channels each; ``out`` reads ``cin`` channels."""

    def __init__(self, cin=8):
        super().__init__()
        self.a, self.a2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.b, self.head = nn.Conv2d(cin, 6, 1), nn.Linear(6, 4)

    def out(self, y):
        return self.head(F.relu(self.b(y)).mean((2, 3)))


class ReshapeAs(Stem):
    def forward(self, x):
        y = self.a(x)
        z = F.relu(self.a2(x)).flatten(2)
        return self.out(z.reshape_as(y) * y + z.view_as(y))


def test_reshape_as_ties_the_other_tensors_channels():
    r = _check(ReshapeAs(), torch.randn(2, 3, 6, 6), pruned=("a.weight", "a2.weight"))
    assert r["report"]["kept"]["a.weight"][0] == r["report"]["kept"]["a2.weight"][0]


class AddCMul(Stem):
    def forward(self, x):
        y = self.a(x)
        return self.out(torch.addcmul(y, self.a2(x), y, value=0.5).addcdiv(y, self.a2(x).abs() + 1))


def test_addcmul_addcdiv():
    _check(AddCMul(), torch.randn(2, 3, 6, 6), pruned=("a.weight", "a2.weight"))


class Narrow(Stem):
    def __init__(self):
        super().__init__(cin=5)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.out(torch.narrow(y.narrow(1, 2, 5), 3, 1, 4))


def test_narrow_over_channels():
    r = _check(Narrow(), torch.randn(2, 3, 6, 6), pruned=("a.weight", "b.weight"))
    assert not r["report"]["barriers"]


class MaxMin(Stem):
    def forward(self, x):
        y = self.a(x)
        v, i = y.max(dim=2, keepdim=True)
        m = torch.min(y, 3).values
        return self.out(v * y + m.unsqueeze(3) + i.float() * 0.01 + torch.max(y, self.a2(x)))


def test_max_min_along_a_non_channel_dim():
    r = _check(MaxMin(), torch.randn(2, 3, 6, 6), pruned=("a.weight", "a2.weight"))
    assert not r["report"]["barriers"]


def test_max_over_channels_pins_them():
    class M(Stem):
        def forward(self, x):
            y = self.a(x)
            return self.out(self.a2(x) * y.max(1, keepdim=True)[0])

    r = _check(M(), torch.randn(2, 3, 6, 6), pruned=("a2.weight",))
    assert "a.weight" not in r["report"]["kept"]


# ------------------------------------------------------------------ former crashes / refusals
class CatOfChunk(Stem):
    def forward(self, x):
        y = F.relu(self.a(x))
        return self.out(torch.cat(y.chunk(2, 1), 1) + torch.cat(torch.split(y, [3, 5], 1), dim=1))


def test_cat_over_a_chunk_or_split_tuple_is_coupled():
    """Was a SurgeryError (the barrier on the tuple pinned nothing)."""
    r = _check(CatOfChunk(), torch.randn(2, 3, 6, 6), pruned=("a.weight",))
    assert not any(b["target"].endswith("cat") for b in r["report"]["barriers"])


def test_cat_over_unbind_and_stack_of_chunk():
    class M(Stem):
        def forward(self, x):
            y = F.relu(self.a(x))
            t = torch.cat(y.unbind(2), 2).view_as(y)  # the unbound (spatial) dim is pinned, channels pass
            s = torch.stack(y.chunk(2, 1), 0).sum(0)
            return self.out(t + torch.cat([s, s], 1))

    _check(M(), torch.randn(2, 3, 6, 6), pruned=("a.weight",))


def test_a_tuple_into_an_op_without_rule_is_pinned_and_reported():
    class M(Stem):
        def forward(self, x):
            y = F.relu(self.a(x))
            return self.out(torch.hstack(y.chunk(2, 1)) + self.a2(x))

    r = _check(M(), torch.randn(2, 3, 6, 6), pruned=("b.weight",), ignore=())
    assert "a.weight" not in r["report"]["kept"] and "a2.weight" not in r["report"]["kept"]
    assert any("hstack" in b["reason"] for b in r["report"]["barriers"])


class ShapeSizedSlice(Stem):
    def forward(self, x):
        y = self.a(x)
        h = y.shape[1] // 2
        z = torch.cat([y[:, :h], y[:, h:] * 2], 1)
        return self.out(F.relu(z) + F.relu(self.a2(x)))


def test_a_slice_sized_from_the_shape_pins_its_channels_and_prunes_the_rest():
    """Was ``TypeError: slice indices must be integers`` from the getitem slim rule."""
    r = _check(ShapeSizedSlice(), torch.randn(2, 3, 6, 6), pruned=("b.weight",), ignore=())
    assert "a.weight" not in r["report"]["kept"]
    assert any("computed bounds" in b["reason"] for b in r["report"]["barriers"])


class Strided(Stem):
    def __init__(self):
        super().__init__(cin=4)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.out(y[:, ::2]) + self.c(y[:, 1::2]).mean((2, 3)) + self.d(y).mean((2, 3))


def test_strided_channel_slices_are_coupled():
    """Was a SurgeryError (the slim rule dropped the step)."""
    r = _check(Strided(), torch.randn(2, 3, 6, 6), pruned=("a.weight",))
    assert not r["report"]["barriers"]


def test_strided_slice_losing_an_inner_channel_selects_with_an_index():
    model = randomize(Strided().eval())
    with torch.no_grad():  # channel 2 (output 1 of ::2) is the weakest: the kept 0, 4, 6 are not evenly spaced
        model.a.weight[2] *= 0.1
        model.a.bias[2] *= 0.1
    r = masked_and_slimmed(model, torch.randn(2, 3, 6, 6), channel_ratio=0.1, ignore=("head",))
    assert r["err"] <= 1e-5 and r["effect"] > 1e-4
    assert r["report"]["kept"]["a.weight"][0] == [0, 1, 3, 4, 5, 6, 7], r["report"]["kept"]
    assert any(n.op == "get_attr" and n.target.startswith("_oba_index_") for n in r["compiled"].graph.nodes)


def test_two_strided_slices_in_one_index_pin_the_second():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.head = nn.Linear(4, 8), nn.Linear(4, 6), nn.Linear(12, 3)

        def forward(self, x):
            t = self.a(x)[:, :, None] * self.c(x)[:, None, :]  # (B, 8, 6): two spaced dims
            return self.head(t[:, ::2, ::2].flatten(1))

    r = _check(M(), torch.randn(3, 4), pruned=("a.weight",))
    assert "c.weight" not in r["report"]["kept"]
    assert any("strided slice next to another" in b["reason"] for b in r["report"]["barriers"])


def test_a_channel_count_read_from_one_tensor_to_reshape_another_pins_and_reports():
    class M(Stem):
        def forward(self, x):
            y = self.a(x)
            z = self.a2(x)
            w = z.reshape(z.shape[0], y.shape[1], -1).reshape(y.shape)  # y's whole shape sizes z
            return self.out(F.relu(w) + F.relu(y)) + self.out(F.relu(self.a2(x)))

    r = _check(M(), torch.randn(2, 3, 6, 6), pruned=("b.weight",), ignore=())
    assert "a.weight" not in r["report"]["kept"]
    assert any("channel count read from a shape" in b["reason"] for b in r["report"]["barriers"])
