"""The directly generated fused HVP program (oba_fx.hvp_direct) and the program cache
(oba_fx.hvp_cache): exact against dense float64 Hessians, used by ``score`` whatever the example
batch size, generated once per model structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hessian_oracle import batch_hessians, dense_case, one_thread_per_test, relative_error  # noqa: F401
import oba_fx
from oba_fx import hvp_cache
from oba_fx.hvp import fused_hvp
from oba_fx.hvp_direct import UnsupportedGraph, build_direct_program

RTOL = 1e-8


class VGGish(nn.Module):
    """Conv-BN-ReLU, max-pool, option-A style strided slice + zero pad residual, dropout, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.pool, self.drop, self.fc = nn.MaxPool2d(2), nn.Dropout(0.5), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.conv2(h) + F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1))
        return self.fc(self.drop(self.pool(h).flatten(1)))


def _vggish():
    torch.manual_seed(0)
    model = VGGish().double().eval()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.running_mean.uniform_(-0.3, 0.3)
        model.bn1.running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_direct_program_equals_dense_hessian_res_bn_cnn(hessian):
    model, data, dense = dense_case("res_bn_cnn")
    fp, hs = dense[0]
    r = build_direct_program(model, param_names=fp.names, hessian=hessian)(model, *data[0])
    assert relative_error(fp.flatten(r.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta) < RTOL
    assert relative_error(fp.flatten(r.grads), hs.grad) < RTOL


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_direct_program_equals_dense_hessian_pool_slice_pad_dropout(hessian):
    model, x, y = _vggish()
    fp, hs = batch_hessians(model, x, y)
    r = build_direct_program(model, param_names=fp.names, hessian=hessian)(model, x, y)
    assert relative_error(fp.flatten(r.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta) < RTOL


def test_direct_program_with_frozen_parameters_is_that_block_of_the_hessian():
    """Frozen conv bias / BN bias / conv weight: their tangent is zero, not their value."""
    model, x, y = _vggish()
    names = ["conv1.weight", "bn1.weight", "conv2.weight", "fc.bias"]
    fp, hs = batch_hessians(model, x, y, names)
    r = build_direct_program(model, param_names=names, hessian="full")(model, x, y)
    assert relative_error(fp.flatten(r.hvps), hs.H @ fp.theta) < RTOL


def test_direct_program_bn_scored_after_frozen_conv_is_that_block_of_the_hessian():
    """BN weight scored with an input without tangent (the folded γ-HVP with ``Ẋ = 0``)."""
    model, x, y = _vggish()
    names = ["bn1.weight", "bn1.bias", "fc.weight"]
    fp, hs = batch_hessians(model, x, y, names)
    r = build_direct_program(model, param_names=names, hessian="full")(model, x, y)
    assert relative_error(fp.flatten(r.hvps), hs.H @ fp.theta) < RTOL


def test_direct_program_serves_any_batch_size():
    model, x, y = _vggish()
    prog = build_direct_program(model)
    r, ref = prog(model, x[:2], y[:2]), fused_hvp(model, (x[:2], y[:2]))
    assert all(torch.allclose(r.hvps[n], ref.hvps[n], rtol=1e-10, atol=1e-12) for n in ref.hvps)


class _Noisy(nn.Module):
    """A random op in the graph: not one fixed function, so no direct program."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        return self.fc2(h + 0.0 * torch.rand_like(h))


def _noisy():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    return _Noisy().double().eval(), [(torch.randn(5, 4, generator=gen, dtype=torch.float64),
                                       torch.randint(0, 3, (5,), generator=gen)) for _ in range(2)]


def test_graph_with_a_random_op_is_refused_by_name():
    model, _ = _noisy()
    with pytest.raises(UnsupportedGraph, match="rand_like"):
        build_direct_program(model)


def _data(n: int = 3, batch: int = 6):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(batch, 2, 4, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(n)]


def _eager_oba(model, data):
    total = None
    for x, y in data:
        r = fused_hvp(model, (x, y))
        s = {n: p.detach() * r.hvps[n] for n, p in model.named_parameters()}
        total = s if total is None else {n: total[n] + s[n] for n in s}
    return {n: t / len(data) for n, t in total.items()}


def test_score_uses_one_cached_program_whatever_the_example_batch_size():
    """Batch-1 example, batches of 6: the program is generated once over two calls, and the
    scores equal the eager fused path's."""
    model, _, _ = _vggish()
    data = _data()
    hvp_cache.clear()
    s1 = oba_fx.score(model, data, example_inputs=(data[0][0][:1],), criterion="oba", progress=False)
    s2 = oba_fx.score(model, data, example_inputs=(data[0][0][:1],), criterion="oba", progress=False)
    assert hvp_cache.stats["generated"] == 1 and hvp_cache.stats["direct"] == 1 and hvp_cache.stats["hits"] == 5
    ref = _eager_oba(model, data)
    for n in ref:
        scale = ref[n].abs().max()
        assert (s1[n] - ref[n]).abs().max() <= 1e-10 * scale + 1e-14 and torch.equal(s1[n], s2[n])


def test_cache_is_invalidated_when_the_structure_changes():
    model, _, _ = _vggish()
    data = _data(n=1)
    hvp_cache.clear()
    oba_fx.score(model, data, criterion="oba", progress=False)
    model.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True).double()  # one bias more
    s = oba_fx.score(model, data, criterion="oba", progress=False)
    assert hvp_cache.stats["generated"] == 2
    assert (s["conv2.bias"] - _eager_oba(model, data)["conv2.bias"]).abs().max() < 1e-12


def test_prune_graph_generates_once_across_calls():
    model, _, _ = _vggish()
    data = _data(n=2)
    hvp_cache.clear()
    for _ in range(2):
        oba_fx.prune_graph(model, (data[0][0][:1],), data=data, criterion="oba", target_flops=0.8)
    assert hvp_cache.stats["direct"] == 1 and hvp_cache.stats["hits"] >= 3


def test_unsupported_model_without_example_inputs_runs_eagerly():
    model, data = _noisy()
    hvp_cache.clear()
    s = oba_fx.score(model, data, criterion="oba", progress=False)
    assert hvp_cache.stats["generated"] == 0 and hvp_cache.stats["unsupported"] == 1
    ref = _eager_oba(model, data)
    assert all((s[n] - ref[n]).abs().max() <= 1e-12 * ref[n].abs().max() + 1e-15 for n in ref)
