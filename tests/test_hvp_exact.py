"""The fused HVP (eager and generated program) equals dense double-backward Hessians.

Oracles: ``tests/hessian_oracle.py`` (row-by-row double backward, float64; one
finite-difference check of the oracle itself). Tolerance: 1e-8 relative (max-abs error over
max-abs value); observed errors are ~1e-15.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp

from hessian_oracle import (CASES, IDS, one_thread_per_test,  # noqa: F401
                            TOY_MODELS, batch_hessians, dense_case, finite_difference_check, flat_params,
                            make_toy, math_attention, relative_error)
from oba_fx.hvp import fused_hvp
from oba_fx.hvp_program import HVPProgram, build_hvp_program
from oba_fx.passes.hvp_codegen import HVPCodegen

RTOL = 1e-8


def _flat(fp, tensors):
    return fp.flatten(tensors)


@pytest.mark.parametrize("name, mode", [("gelu_layernorm", "eval"), ("res_bn_cnn", "train"),
                                        ("transformer_block", "eval")])
def test_oracle_hessian_agrees_with_finite_differences(name, mode):
    """The double-backward oracle H equals central differences of the exact gradient (LayerNorm,
    train-mode BatchNorm, and a transformer block with SDPA on the default kernel), to 1e-6."""
    model, data, dense = dense_case(name, mode)
    fp, hs = dense[0]
    x, y = data[0]
    err = finite_difference_check(lambda v: F.cross_entropy(fp.logits(v, x), y), fp.theta, hs.H)
    assert err < 1e-6


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_functional_hvp_equals_dense_functional_hessian_times_theta(name, mode):
    model, data, dense = dense_case(name, mode)
    fp, hs = dense[0]
    r = fused_hvp(model, data[0], param_names=fp.names, hessian="functional")
    assert relative_error(_flat(fp, r.hvps), hs.H_F @ fp.theta) < RTOL


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_full_hvp_equals_dense_hessian_times_theta(name, mode):
    model, data, dense = dense_case(name, mode)
    fp, hs = dense[0]
    r = fused_hvp(model, data[0], param_names=fp.names, hessian="full")
    assert relative_error(_flat(fp, r.hvps), hs.H @ fp.theta) < RTOL


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_same_pass_returns_exact_gradient_and_loss(name, mode):
    model, data, dense = dense_case(name, mode)
    fp, hs = dense[0]
    r = fused_hvp(model, data[0], param_names=fp.names, hessian="full")
    assert relative_error(_flat(fp, r.grads), hs.grad) < RTOL
    assert abs(float(r.loss - hs.loss)) < 1e-12


@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_arbitrary_tangent_gives_hessian_times_that_tangent(hessian):
    model, data, dense = dense_case("gelu_layernorm")
    fp, hs = dense[0]
    v = torch.randn(fp.theta.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = fused_hvp(model, data[0], param_names=fp.names, hessian=hessian, tangents=fp.unflatten(v))
    ref = (hs.H if hessian == "full" else hs.H_F) @ v
    assert relative_error(_flat(fp, r.hvps), ref) < RTOL


def test_functional_hessian_is_nonzero_in_every_toy_model():
    """Guards the other tests against trivially passing on zero curvature."""
    for name in TOY_MODELS:
        fp, hs = dense_case(name)[2][0]
        assert (hs.H_F @ fp.theta).abs().max() > 1e-3, name


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_parameter_the_loss_does_not_depend_on_gets_zeros():
    torch.manual_seed(0)
    model = _WithUnused().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for hessian in ("functional", "full"):
        r = fused_hvp(model, (x, y), hessian=hessian)
        assert torch.count_nonzero(r.hvps["unused.weight"]) == 0 and torch.count_nonzero(r.grads["unused.bias"]) == 0
        assert r.hvps["fc1.weight"].abs().max() > 0


def test_param_subset_gives_that_block_of_the_hessian():
    model, data, dense = dense_case("tanh_mlp")
    names = ["fc1.weight", "fc3.weight"]
    fp, hs = batch_hessians(model, *data[0], names=names)
    r = fused_hvp(model, data[0], param_names=names, hessian="full")
    assert sorted(r.hvps) == sorted(names)
    assert relative_error(_flat(fp, r.hvps), hs.H @ fp.theta) < RTOL


def test_multihead_attention_projections_are_exact():
    """nn.MultiheadAttention (packed q/k/v projection, scaled-dot-product attention)."""

    class MHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = MHA().double().eval()
    x, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    with math_attention():
        fp, hs = batch_hessians(model, x, y)
    r = fused_hvp(model, (x, y), param_names=fp.names, hessian="functional")
    assert relative_error(_flat(fp, r.hvps), hs.H_F @ fp.theta) < RTOL
    assert r.hvps["mha.in_proj_weight"].abs().max() > 0


def test_train_mode_batchnorm_running_stats_are_not_updated():
    model, data = make_toy("res_bn_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused_hvp(model, data[0], hessian="full")
    build_hvp_program(model, data[0], hessian="full")(model, *data[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------- program


@pytest.mark.parametrize("name, mode", [("res_bn_cnn", "eval"), ("res_bn_cnn", "train"), ("gelu_layernorm", "eval"),
                                        ("self_attention", "eval"), ("transformer_block", "eval")])
@pytest.mark.parametrize("hessian", ["functional", "full"])
def test_generated_program_equals_eager(name, mode, hessian):
    model, data, dense = dense_case(name, mode)
    fp, hs = dense[0]
    prog = build_hvp_program(model, data[0], param_names=fp.names, hessian=hessian)
    got, ref = prog(model, *data[0]), fused_hvp(model, data[0], param_names=fp.names, hessian=hessian)
    assert relative_error(_flat(fp, got.hvps), _flat(fp, ref.hvps)) < 1e-12
    assert relative_error(_flat(fp, got.grads), _flat(fp, ref.grads)) < 1e-12
    assert relative_error(_flat(fp, got.hvps), (hs.H if hessian == "full" else hs.H_F) @ fp.theta) < RTOL


def test_generated_program_reuses_the_primal_convolution_for_the_tangent():
    """conv1 (zero input tangent) needs 1 convolution, conv2 needs 2 (Y and W ⋆ Ẋ), not 3 each."""
    model, data, _ = dense_case("res_bn_cnn")
    prog = build_hvp_program(model, data[0])
    convs = [n for n in prog.graph_module.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert len(convs) == 3


def test_program_without_grad_outputs_only_loss_and_hvps():
    model, data, dense = dense_case("tanh_mlp")
    fp, hs = dense[0]
    prog = build_hvp_program(model, data[0], with_grad=False)
    out = prog.graph_module(*prog.inputs(model, *data[0]))
    assert len(out) == 1 + len(prog.param_names)
    r = prog(model, *data[0])
    assert r.grads == {} and relative_error(_flat(fp, r.hvps), hs.H_F @ fp.theta) < RTOL


def test_program_refuses_other_shapes_and_modes():
    model, data, _ = dense_case("res_bn_cnn")
    prog = build_hvp_program(model, data[0])
    x, y = data[0]
    assert prog.matches(model, x, y)
    assert not prog.matches(model, x[:2], y[:2])
    model.train()
    try:
        assert not prog.matches(model, x, y)
        with pytest.raises(ValueError, match="other input shapes or another train/eval mode"):
            prog(model, x, y)
    finally:
        model.eval()


def test_hvp_codegen_pass_stores_program_and_leaves_graph_unchanged():
    model, data, dense = dense_case("se_gate")
    fp, hs = dense[0]
    gm = torch.fx.symbolic_trace(model)
    code = gm.code
    res = HVPCodegen(data[0], hessian="full")(gm)
    assert isinstance(res, PassResult) and res.graph_module is gm and res.modified is False
    assert gm.code == code
    prog = gm.meta["oba.hvp_program"]
    assert isinstance(prog, HVPProgram) and prog.hessian == "full" and list(prog.param_names) == fp.names
    assert relative_error(_flat(fp, prog(gm, *data[0]).hvps), hs.H @ fp.theta) < RTOL


def test_hvp_codegen_pass_without_batch_uses_shape_propagation():
    model, data, dense = dense_case("tanh_mlp")
    fp, hs = dense[0]
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(data[0][0])
    HVPCodegen()(gm)
    assert relative_error(_flat(fp, gm.meta["oba.hvp_program"](gm, *data[0]).hvps), hs.H_F @ fp.theta) < RTOL


def test_unknown_hessian_name_is_rejected():
    model, data, _ = dense_case("tanh_mlp")
    with pytest.raises(ValueError, match="expected one of \\('functional', 'full'\\)"):
        fused_hvp(model, data[0], hessian="gauss_newton")
    with pytest.raises(ValueError, match="functional"):
        HVPCodegen(hessian="exact")


def test_flat_params_round_trip():
    model, _, _ = dense_case("tanh_mlp")
    fp = flat_params(model)
    assert torch.equal(fp.flatten(fp.unflatten(fp.theta)), fp.theta)


@pytest.mark.parametrize("act", [nn.SiLU, nn.Mish])
def test_activations_whose_backward_has_no_forward_mode_formula_are_exact(act):
    """torch 2.14.1 has no forward-mode formula for silu_backward / mish_backward; the fused HVP
    falls back to a create_graph backward and stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    fp, hs = batch_hessians(model, x, y)
    r = fused_hvp(model, (x, y), param_names=fp.names, hessian="full")
    assert relative_error(_flat(fp, r.hvps), hs.H @ fp.theta) < RTOL
