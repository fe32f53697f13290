"""Core behaviour of ``oba_fx.prune_graph``: one claim per test.

Outputs are checked against ``_oracle.masked_original`` (the eager original masked from the
report alone) where a masked comparison is the claim.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import oba_fx
from _oracle import check_params_sliced, masked_and_slimmed, one_thread, randomize, rel_err  # noqa: F401 (fixture)

TOL = 1e-4


def conv_bn_net(c1: int = 8, c2: int = 8, n_out: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, n_out))


# ---------------------------------------------------------------- dead channels
DEAD = [1, 5]


def dead_channel_net() -> nn.Module:
    """conv_bn_net whose first conv's channels DEAD are dead: their conv rows and bias, their BN
    affine parameters and the second conv's input columns are all zero."""
    torch.manual_seed(0)
    net = randomize(conv_bn_net()).eval()
    with torch.no_grad():
        net[0].weight[DEAD] = 0
        net[0].bias[DEAD] = 0
        net[1].weight[DEAD] = 0
        net[1].bias[DEAD] = 0
        net[3].weight[:, DEAD] = 0
    return net


def test_l1_removes_dead_channels_first():
    net = dead_channel_net()
    out = oba_fx.prune_graph(net, torch.randn(2, 3, 8, 8), criterion="l1", channel_ratio=len(DEAD) / 16)
    rep = out.meta["oba"]
    assert rep["units_prunable"] == 16 and rep["units_removed"] == len(DEAD)
    alive = [i for i in range(8) if i not in DEAD]
    assert rep["kept"] == {"0.weight": {0: alive}, "0.bias": {0: alive}, "1.weight": {0: alive},
                           "1.bias": {0: alive}, "3.weight": {1: alive}}


def test_removing_dead_channels_leaves_output_unchanged():
    net = dead_channel_net()
    x = torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(net, x, criterion="l1", channel_ratio=len(DEAD) / 16)
    assert out.get_submodule("0").out_channels == 8 - len(DEAD)
    with torch.no_grad():
        assert rel_err(out(x), net(x)) <= 1e-6  # the UNMASKED original: nothing to mask


# ---------------------------------------------------------------- the input model is untouched
def test_prune_graph_and_explain_leave_the_input_model_bit_identical():
    torch.manual_seed(0)
    net = randomize(conv_bn_net())
    net.train()  # a forward in training mode would update BN running statistics
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(4, 3, 8, 8)
    oba_fx.prune_graph(net, x, criterion="l1", channel_ratio=0.5)
    oba_fx.explain(net, x)
    after = net.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert net.training and all(m.training for m in net.modules())


# ---------------------------------------------------------------- FLOPs against fvcore
def _fvcore_total(model: nn.Module, x: torch.Tensor) -> int:
    from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(model, x)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return int(fa.total())


FLOP_MODELS = {
    "conv_bn_linear": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                             nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(8 * 6 * 6, 10)), 8),
    "resnet18": (lambda: torchvision.models.resnet18(), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 32),
}


@pytest.mark.parametrize("name", list(FLOP_MODELS))
def test_report_flops_equal_fvcore_before_and_after(name):
    """Same convention as fvcore (one multiply-add = one FLOP; conv, linear, eval-mode BN at 2 per
    element with affine, adaptive average pooling at 1 per input element; adds, activations and
    max-pooling not counted), so the numbers agree exactly."""
    build, side = FLOP_MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, side, side)
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.3)
    rep = out.meta["oba"]
    assert rep["flops_before"] == _fvcore_total(model, x)
    assert rep["flops_after"] == _fvcore_total(out, x)
    assert rep["flops_after"] < rep["flops_before"]


def tiny_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10)


def test_report_flops_equal_fvcore_for_swin_window_attention():
    """torchvision's ``shifted_window_attention`` is one opaque call (a barrier): its qkv and
    output projections and its two attention matmuls, over the tokens padded to whole windows,
    must still be counted. A 24x24 input gives 6x6 then 3x3 token maps: both padded (to 8x8 and
    4x4), the first also shifted."""
    torch.manual_seed(0)
    model = tiny_swin().eval()
    x = torch.randn(2, 3, 24, 24)
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.3)
    rep = out.meta["oba"]
    assert rep["flops_before"] == _fvcore_total(model, x)
    assert rep["flops_after"] == _fvcore_total(out, x)
    assert rep["flops_after"] < rep["flops_before"]


def test_report_flops_count_attention_matmuls_that_fvcore_skips():
    """Documented convention difference: ``nn.MultiheadAttention`` computes its scores with
    ``F.scaled_dot_product_attention``, which fvcore does not count (it lists
    ``aten::scaled_dot_product_attention`` as unsupported). We count its two matmuls, ``q kᵀ`` and
    ``attn · v``, at ``B * S * S * E`` each, like any other matmul; everything else agrees."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    layers, hidden, batch = 2, 32, 2
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=layers, num_heads=2, hidden_dim=hidden,
                              mlp_dim=64, num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    seq = (32 // 16) ** 2 + 1  # patches + class token
    sdpa = layers * 2 * batch * seq * seq * hidden
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.3)
    rep = out.meta["oba"]
    assert rep["flops_before"] - _fvcore_total(model, x) == sdpa
    assert rep["flops_after"] - _fvcore_total(out, x) == sdpa
    assert rep["flops_after"] < rep["flops_before"]


def test_report_flops_equal_fvcore_for_einsum_attention_up_to_fvcore_rounding():
    """Documented convention difference: fvcore counts an einsum by parsing the text report of
    ``np.einsum_path``, which prints the count as ``%.3e``: 4 significant digits. We count a
    contracting two-operand einsum exactly (the product of all its index sizes). With fvcore's
    einsum handle replaced by that exact count, the totals agree exactly (MaxViT's attention is
    two einsums, each an opaque call, i.e. a barrier)."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape
    from torchvision.models.maxvit import MaxVit

    def exact_einsum(inputs, outputs):
        eq = inputs[0].toIValue().replace(" ", "")
        sizes = {}
        for term, v in zip(eq.split("->")[0].split(","), inputs[1].node().inputs()):
            sizes.update(zip(term, get_shape(v)))
        return int(np.prod(list(sizes.values())))

    def fvcore_exact(model, x):
        fa = FlopCountAnalysis(model, x).set_op_handle("aten::einsum", exact_einsum)
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        return int(fa.total())

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=4, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.3)
    rep = out.meta["oba"]
    assert rep["flops_before"] == fvcore_exact(model, x)
    assert rep["flops_after"] == fvcore_exact(out, x)
    assert rep["flops_after"] < rep["flops_before"]


# ---------------------------------------------------------------- argument errors
@pytest.mark.parametrize("kwargs, expected", [
    (dict(channel_ratio=1.5), r"channel_ratio.*\[0, 1\).*1\.5"),
    (dict(target_flops=0), r"target_flops.*\(0, 1\]"),
    (dict(channel_ratio=0.3, target_flops=0.5), r"exactly one target.*channels.*flops"),
    (dict(channel_ratio=0.3, criterion="l3"), r"unknown criterion 'l3'.*expected one of.*l1"),
])
def test_bad_arguments_raise_value_error_saying_what_was_expected(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        oba_fx.prune_graph(conv_bn_net().eval(), torch.randn(1, 3, 8, 8), **kwargs)


@pytest.mark.parametrize("bad, expected", [
    (torch.randn(1, 4, 8, 8), r"shapes \[\(1, 4, 8, 8\)\].*expected.*3 channels"),
    (torch.randn(3, 8, 8), r"shapes \[\(3, 8, 8\)\].*expected 4D input"),
    ((torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)), r"2 positional input.*takes 1 to 1"),
])
def test_example_inputs_of_the_wrong_shape_raise_value_error_saying_what_was_expected(bad, expected):
    with pytest.raises(ValueError, match=expected):
        oba_fx.prune_graph(conv_bn_net().eval(), bad, channel_ratio=0.3)


# ---------------------------------------------------------------- untraceable code
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: symbolic tracing cannot follow it
            return self.conv(x)
        return x


class WithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = DataDependent()
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.head(F.relu(self.mid(x)))


def test_untraceable_submodule_raises_trace_error_naming_module_and_line():
    with pytest.raises(oba_fx.TraceError) as info:
        oba_fx.prune_graph(WithUntraceable().eval(), torch.randn(1, 3, 8, 8), channel_ratio=0.3)
    msg = str(info.value)
    line = inspect.getsourcelines(DataDependent.forward)[1] + 1
    assert "'block'" in msg
    assert f"{__file__}:{line}: if x.sum() > 0:" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


@pytest.mark.parametrize("leaf", ["block", DataDependent], ids=["by_name", "by_class"])
def test_untraceable_submodule_declared_leaf_traces_and_is_a_barrier(leaf):
    torch.manual_seed(0)
    model = WithUntraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    r = masked_and_slimmed(model, x, channel_ratio=0.3, leaf_modules=[leaf])
    rep = r["report"]
    assert [b["target"] for b in rep["barriers"]] == ["block"]
    assert not any(k.startswith(("block.", "stem.")) for k in rep["kept"])  # read by the leaf: unprunable
    assert "mid.weight" in rep["kept"]  # the rest still prunes
    assert r["err"] <= TOL


# ---------------------------------------------------------------- ignore=
def test_ignored_layer_keeps_its_parameters():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))).eval()
    x = torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.2, ignore=["6"])
    rep = out.meta["oba"]
    assert not any(k.startswith("6.") for k in rep["kept"])
    for name in ("weight", "bias"):
        assert torch.equal(getattr(out.get_submodule("6"), name), getattr(model[6], name))
    assert "0.weight" in rep["kept"]  # the first conv, not adjacent to the ignored one, was pruned


# ---------------------------------------------------------------- option-A CIFAR ResNets
WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def _expected_pads(model: nn.Module, kept: dict) -> list[tuple]:
    """The pad tuple each option-A block should have after slimming, from the report: of the
    block's output channels ``[lo, lo + c_in)`` hold the shortcut, the rest are zero padding."""
    pads = []
    for name, block in model.named_modules():
        if getattr(block, "shortcut_kind", None) != "A":
            continue
        c_out, c_in = block.conv2.out_channels, block.conv1.in_channels
        lo = (c_out - c_in) // 2
        k = np.asarray(kept.get(f"{name}.bn2.weight", {}).get(0, list(range(c_out))))
        pads.append((0, 0, 0, 0, int((k < lo).sum()), int((k >= lo + c_in).sum())))
    return pads


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_option_a_cifar_resnet_prunes_to_half_flops_with_rewritten_pads(name, data_dir):
    from oba_fx.models import get_model

    model = get_model(name, weights=data_dir / "weights" / WEIGHTS[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    # keep_residual=False: the residual stream goes too, so the option-A pads must be rewritten
    r = masked_and_slimmed(model, x, criterion="l1", target_flops=0.5, keep_residual=False)
    rep, out = r["report"], r["compiled"]
    assert rep["flops_after"] <= 0.5 * rep["flops_before"]
    assert r["err"] <= TOL and rep["max_rel_error"] <= TOL
    check_params_sliced(model, out, rep["kept"])
    pads = [n.args[1] for n in out.graph.nodes if n.target is F.pad]
    want = _expected_pads(model, rep["kept"])
    assert len(want) == 2 and [tuple(p) for p in pads] == want
    for p in want:  # in the generated code, not only in the graph object
        assert f"{p}" in out.code
    assert any(p[4:] != q for p, q in zip(want, [(8, 8), (16, 16)]))  # at least one pad changed


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_pruned_option_a_resnet_accuracy_is_a_fraction(name, data_dir):
    from oba_fx.data import cifar10_loader
    from oba_fx.evaluate import evaluate
    from oba_fx.models import get_model

    model = get_model(name, weights=data_dir / "weights" / WEIGHTS[name]).eval()
    out = oba_fx.prune_graph(model, torch.randn(2, 3, 32, 32), criterion="l1", target_flops=0.5)
    acc = evaluate(out, cifar10_loader(data_dir, "test_lossless1k", batch_size=100, limit=200))
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0


# ---------------------------------------------------------------- round_to
def test_round_to_keeps_multiples_in_every_fully_prunable_group():
    from oba_fx import meta as M
    from oba_fx.passes.pipeline import analyze_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    out = oba_fx.prune_graph(model, x, criterion="l1", channel_ratio=0.3, round_to=8)
    kept = out.meta["oba"]["kept"]
    c = analyze_model(model, (x,)).meta[M.COUPLING]
    params = dict(model.named_parameters())
    kept_units: set[int] = set()
    for (pname, dim), s in c.param_spaces.items():
        if pname in params:
            k = kept.get(pname, {}).get(dim, list(range(s.size)))
            kept_units.update(c.units_of(s)[k].tolist())
    full = [g for g in range(c.n_groups) if c.prunable[c.group == g].all()]
    assert len(full) > 5
    pruned = 0
    for g in full:
        units = np.nonzero(c.group == g)[0]
        n_kept = sum(int(u) in kept_units for u in units)
        assert n_kept % 8 == 0, f"group {g}: {n_kept} of {len(units)} units kept"
        pruned += n_kept < len(units)
    assert pruned > 0
