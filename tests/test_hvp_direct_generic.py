"""The directly generated fused HVP program on graphs beyond the CNN rules: the generic rule
(oba_fx.hvp_generic), the hand-written LayerNorm / GELU / attention rules (oba_fx.hvp_direct_tf),
parameters read with get_attr, and the refusals (oba_fx.hvp_direct_refuse). Exact against dense
float64 Hessians (tests/hessian_oracle.py) or the eager fused_hvp."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hessian_oracle import CASES, batch_hessians, dense_case, math_attention, one_thread_per_test, relative_error  # noqa: F401
import oba_fx
from oba_fx import hvp_cache
from oba_fx.hvp import fused_hvp
from oba_fx.hvp_direct import UnsupportedGraph, build_direct_program
from oba_fx.hvp_generic import NodeFn
from oba_fx.models.vit_cifar import vit_cifar
from oba_fx.tracing import trace

RTOL = 1e-8


def _exact(prog, model, x, y, hessian, names=None):
    with math_attention():
        fp, hs = batch_hessians(model, x, y, names)
    r = prog(model, x, y)
    return relative_error(fp.flatten(r.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta)


@pytest.mark.parametrize("name", sorted({n for n, m in CASES if m == "eval"}))
@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_every_toy_model_gets_an_exact_program(name, hessian):
    """tanh MLP, LayerNorm + GELU, softmax(q kᵀ) v with matmuls of two activations, SE gate,
    attention, a transformer block, functional layers on get_attr parameters."""
    model, data, dense = dense_case(name)
    fp, hs = dense[0]
    r = build_direct_program(model, param_names=fp.names, hessian=hessian)(model, *data[0])
    assert relative_error(fp.flatten(r.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta) < RTOL
    assert relative_error(fp.flatten(r.grads), hs.grad) < RTOL


class MHABlock(nn.Module):
    """Pre-norm block with torch's MultiheadAttention (lowered by oba_fx's tracer), GELU MLP, and
    a hand-written softmax pooling (a matmul of two activations) before the head."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 6), nn.Linear(6, d)
        self.pool, self.head = nn.Linear(d, 1), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.mha(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        w = torch.softmax(self.pool(x).transpose(1, 2), dim=-1)  # (B, 1, N)
        return self.head((w @ x).squeeze(1))


def _randomise(model: nn.Module, seed: int = 3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_mha_block_traced_by_oba_fx_is_exact(hessian):
    torch.manual_seed(0)
    model = trace(_randomise(MHABlock().double().eval()))
    targets = {getattr(n.target, "__name__", n.target) for n in model.graph.nodes}
    assert "scaled_dot_product_attention" in targets and "softmax" in targets and "matmul" in targets
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    assert _exact(build_direct_program(model, hessian=hessian), model, x, y, hessian) < RTOL


def _tiny_vit():
    torch.manual_seed(0)
    model = _randomise(vit_cifar(num_classes=3, image_size=8, patch=4, dim=8, depth=2, heads=2, mlp_dim=12))
    model = trace(model.double().eval())
    gen = torch.Generator().manual_seed(5)
    return model, torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)


def _close(a: dict, b: dict, rtol: float = 1e-9) -> bool:
    return all((a[n] - b[n]).abs().max() <= rtol * b[n].abs().max() + 1e-13 for n in b)


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_tiny_vit_program_equals_eager_fused_hvp_at_another_batch_size(hessian):
    """Generated once; run on batches of 6 and 2 (cls token, position embedding via get_attr)."""
    model, x, y = _tiny_vit()
    prog = build_direct_program(model, hessian=hessian)
    for n in (6, 2):
        r, ref = prog(model, x[:n], y[:n]), fused_hvp(model, (x[:n], y[:n]), hessian=hessian)
        assert _close(r.hvps, ref.hvps) and _close(r.grads, ref.grads)


class Mixed(nn.Module):
    """Specific rules (conv, BN, ReLU, linear, add) beside generic ones: tanh-GELU, PReLU and
    GroupNorm modules with their own parameters, softmax / cat / clamp / leaky_relu with
    non-tensor arguments, an in-place method on a tensor nobody else reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gn, self.act, self.prelu = nn.GroupNorm(2, 4), nn.GELU(approximate="tanh"), nn.PReLU(4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.prelu(self.act(self.gn(h))) + h
        h = torch.cat([F.leaky_relu(h, 0.2), torch.softmax(h, dim=1)], dim=1)
        h = h.clamp(min=-2.0, max=3.0).mean((2, 3))
        return self.fc(h.mul_(2.0))


def _mixed():
    torch.manual_seed(0)
    model = _randomise(Mixed().double().eval())
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(6)
    return model, torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_mixed_specific_and_generic_rules_are_exact(hessian):
    model, x, y = _mixed()
    prog = build_direct_program(model, hessian=hessian)
    kinds = {type(getattr(n.target, "__self__", None)).__name__ for n in prog.graph_module.graph.nodes}
    assert "NodeFn" in kinds
    assert any(n.target is torch.ops.aten.convolution.default for n in prog.graph_module.graph.nodes)
    assert _exact(prog, model, x, y, hessian) < RTOL


def test_frozen_parameters_inside_generic_and_layer_norm_nodes_are_that_block_of_the_hessian():
    """GroupNorm weight and PReLU weight frozen (generic nodes), LayerNorm weight frozen and its
    bias scored (the hand-written rule): their tangent is zero, not their value."""
    model, x, y = _mixed()
    names = [n for n, _ in model.named_parameters() if n not in ("gn.weight", "prelu.weight")]
    assert _exact(build_direct_program(model, param_names=names, hessian="full"), model, x, y, "full", names) < RTOL
    block, data, _ = dense_case("transformer_block")
    names = [n for n, _ in block.named_parameters() if n not in ("ln1.weight", "ln2.bias", "q.weight")]
    prog = build_direct_program(block, param_names=names, hessian="full")
    assert _exact(prog, block, *data[0], "full", names) < RTOL


def test_prune_graph_on_a_vit_uses_the_direct_program_and_matches_the_eager_scores(caplog):
    model, x, y = _tiny_vit()
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    hvp_cache.clear()
    with caplog.at_level(logging.INFO, logger="oba_fx.hvp_cache"):
        s = oba_fx.score(model, data, example_inputs=(x[:1],), criterion="oba", progress=False)
        oba_fx.prune_graph(model, (x[:1],), data=data, criterion="oba", target_flops=0.8)
    assert hvp_cache.stats["direct"] >= 1 and hvp_cache.stats["make_fx"] == 0 and hvp_cache.stats["unsupported"] == 0
    assert "no direct HVP program" not in caplog.text
    ref = {}
    for xb, yb in data:
        r = fused_hvp(model, (xb, yb))
        for n, p in model.named_parameters():
            ref[n] = ref.get(n, 0) + p.detach() * r.hvps[n] / len(data)
    assert _close(s, ref)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h + 0.0 * torch.randn_like(h)


class SharedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        g = h.mul_(2.0)
        return g + h


@pytest.mark.parametrize("model, match", [
    (Noisy(), "randn_like is random"),
    (SharedInPlace(), "in-place op on a tensor that other nodes read"),
    (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train(), "dropout in train mode"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 3)).train(), "BatchNorm"),
], ids=["random", "in-place-shared", "dropout-train", "batchnorm-train"])
def test_what_is_not_one_fixed_function_is_refused_by_name(model, match):
    with pytest.raises(UnsupportedGraph, match=match):
        build_direct_program(model)


def test_generic_rule_leaves_the_model_and_its_buffers_unchanged():
    model, x, y = _mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_direct_program(model, hessian="full")(model, x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nodefn_without_forward_ad_formula_falls_back_to_double_backward():
    """native_group_norm_backward has no forward-AD formula: the tangent of the pullback comes
    from double backward and equals the jvp-free reference."""
    gen = torch.Generator().manual_seed(7)
    x, w, b, g = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 4, 2), (4,), (4,), (3, 4, 2)))
    fn = NodeFn.build(F.group_norm, (x, 2, w, b), {}, active=[0, 2])
    flat = fn.flat_values((x, 2, w, b), {})
    y, _ = fn.forward(flat, [x, w], [], [])
    xbar, xdbar, _, _ = fn.backward(flat, [x, w], [], [], y, g, None)

    def pull(a, ww):
        return torch.func.vjp(lambda a_, w_: F.group_norm(a_, 2, w_, b), a, ww)[1](g)
    fd = (pull(x + 1e-6 * x, w + 1e-6 * w)[0] - pull(x - 1e-6 * x, w - 1e-6 * w)[0]) / 2e-6
    assert torch.allclose(xbar[0], pull(x, w)[0])
    assert (xdbar[0] - fd).abs().max() <= 1e-5 * fd.abs().max()  # central differences, step 1e-6


class TokenModel(nn.Module):
    """Integer token ids: an Embedding (a generic leaf module whose only variable is its weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.ln, self.fc = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.emb(x)).mean(1))


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_embedding_of_integer_inputs_is_exact(hessian):
    torch.manual_seed(0)
    model = _randomise(TokenModel().double().eval())
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randint(0, 7, (5, 3), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    assert _exact(build_direct_program(model, hessian=hessian), model, x, y, hessian) < RTOL


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_transformer_block_through_the_generic_rule_alone_is_exact(hessian, monkeypatch):
    """LayerNorm, GELU and attention by torch.func on each op (the hand-written rules off)."""
    from oba_fx.hvp_direct import _Generator

    monkeypatch.setattr(_Generator, "transformer_rules", False)
    model, data, dense = dense_case("transformer_block")
    fp, hs = dense[0]
    prog = build_direct_program(model, hessian=hessian)
    assert not any(getattr(n.target, "__module__", "") == "oba_fx.hvp_direct_tf" for n in prog.graph_module.graph.nodes)
    r = prog(model, *data[0])
    assert relative_error(fp.flatten(r.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta) < RTOL
