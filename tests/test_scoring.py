"""``oba_fx.scoring.score`` equals its definition computed densely (float64 toy models).

Every data criterion is averaged over two batches and compared with the same average of dense
quantities from ``tests/hessian_oracle.py`` to 1e-8 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from hessian_oracle import (CASES, IDS, TOY_MODELS, dense_case, empirical_fisher_diag, hadamard, make_toy,  # noqa: F401
                            one_thread_per_test, relative_error)
from oba_fx.hvp_program import HVPProgram
from oba_fx.passes.hvp_codegen import HVPCodegen
from oba_fx.criteria import criterion_names
from oba_fx.estimators import hutchinson_diagonal
from oba_fx.scoring import score

RTOL = 1e-8


def _flat_score(fp, s):
    return fp.flatten(s)


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_oba_functional_equals_theta_times_dense_functional_hessian_theta(name, mode):
    model, data, dense = dense_case(name, mode)
    s = score(model, data, criterion="oba", hessian="functional", progress=False, mode=mode)
    ref = _mean([fp.theta * (hs.H_F @ fp.theta) for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_oba_full_equals_theta_times_dense_hessian_theta(name, mode):
    model, data, dense = dense_case(name, mode)
    s = score(model, data, criterion="oba", hessian="full", progress=False, mode=mode)
    ref = _mean([fp.theta * (hs.H @ fp.theta) for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


def test_oba_first_order_term_adds_theta_times_gradient():
    model, data, dense = dense_case("gelu_layernorm")
    s = score(model, data, criterion="oba", hessian="functional", first_order=-0.5, progress=False)
    ref = _mean([fp.theta * (hs.H_F @ fp.theta) - 0.5 * fp.theta * hs.grad for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_taylor_equals_theta_times_gradient(name, mode):
    model, data, dense = dense_case(name, mode)
    s = score(model, data, criterion="taylor", progress=False, mode=mode)
    ref = _mean([fp.theta * hs.grad for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


@pytest.mark.parametrize("name, mode", CASES, ids=IDS)
def test_obd_fisher_equals_theta_squared_times_dense_empirical_fisher_diagonal(name, mode):
    model, data, dense = dense_case(name, mode)
    s = score(model, data, criterion="obd_fisher", progress=False, mode=mode)
    fp = dense[0][0]
    ref = _mean([fp.theta.square() * empirical_fisher_diag(model, x, y) for x, y in data])
    assert relative_error(_flat_score(fp, s), ref) < RTOL


def test_hutchinson_with_hadamard_probes_is_the_exact_diagonal():
    """Rows of a Hadamard matrix are Rademacher vectors with orthogonal columns: exact diag(H)."""
    model, data, dense = dense_case("gelu_layernorm")
    fp, hs = dense[0]
    rows = hadamard(fp.theta.numel())[:, :fp.theta.numel()]
    d = hutchinson_diagonal(model, data[0], [fp.unflatten(r) for r in rows])
    assert relative_error(fp.flatten(d), hs.H.diagonal()) < RTOL


def test_hutchinson_score_is_within_its_statistical_error_of_theta_squared_diag_h():
    """Per entry, the K-probe estimate has standard deviation sqrt(Σ_{j≠i} H_ij² / K)."""
    model, data, dense = dense_case("tanh_mlp", n_batches=2)
    k = 48
    s = score(model, data, criterion="obd_hutchinson", probes=k, seed=1, progress=False)
    fp = dense[0][0]
    ref = _mean([fp.theta.square() * hs.H.diagonal() for _, hs in dense])
    var = _mean([(hs.H.square().sum(1) - hs.H.diagonal().square()) / k for _, hs in dense]) / len(dense)
    sigma = fp.theta.square() * var.sqrt()
    err = (_flat_score(fp, s) - ref).abs()
    assert bool((err <= 5 * sigma + 1e-12).all())
    assert relative_error(_flat_score(fp, s), ref) < 0.5


def test_hutchinson_is_reproducible_by_seed():
    model, data, _ = dense_case("tanh_mlp")
    a = score(model, data, criterion="obd_hutchinson", probes=2, seed=5, progress=False)
    b = score(model, data, criterion="obd_hutchinson", probes=2, seed=5, progress=False)
    c = score(model, data, criterion="obd_hutchinson", probes=2, seed=6, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_data_free_criteria():
    model, _, _ = dense_case("tanh_mlp")
    params = dict(model.named_parameters())
    l1, l2 = score(model, None, criterion="l1"), score(model, None, criterion="l2")
    assert all(torch.equal(l1[n], p.detach().abs()) and torch.equal(l2[n], p.detach().square())
               for n, p in params.items())
    r0, r0b, r1 = (score(model, None, criterion="random", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(r0[n], r0b[n]) and r0[n].shape == p.shape for n, p in params.items())
    assert all(bool(((r0[n] >= 0) & (r0[n] < 1)).all()) for n in params)
    assert not torch.equal(r0["fc1.weight"], r1["fc1.weight"])


def test_unknown_names_are_rejected_with_the_valid_ones_listed():
    model, data, _ = dense_case("tanh_mlp")
    with pytest.raises(ValueError) as e:
        score(model, data, criterion="hessian_trace")
    assert all(c in str(e.value) for c in criterion_names())
    with pytest.raises(ValueError, match="'functional', 'full'"):
        score(model, data, hessian="fisher")
    with pytest.raises(ValueError, match="'eval', 'train', 'keep'"):
        score(model, data, mode="test")


@pytest.mark.parametrize("criterion", ["oba", "taylor", "obd_fisher", "obd_hutchinson"])
@pytest.mark.parametrize("start, mode", [("train", "eval"), ("eval", "train"), ("train", "keep")])
def test_model_state_and_modes_are_untouched(criterion, start, mode):
    model, data = make_toy("res_bn_cnn")
    model.train(start == "train")
    model.bn2.eval()  # a mixed-mode model: flags are restored per module
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score(model, data, criterion=criterion, hessian="full", probes=1, progress=False, mode=mode)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


def test_default_mode_scores_the_eval_function_of_a_model_in_train_mode():
    model, data, dense = dense_case("res_bn_cnn", "eval")
    model.train()
    try:
        s = score(model, data, criterion="oba", progress=False)
    finally:
        model.eval()
    ref = _mean([fp.theta * (hs.H_F @ fp.theta) for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


def test_max_batches_limits_the_average():
    model, data, dense = dense_case("tanh_mlp")
    s = score(model, iter(data), criterion="oba", max_batches=1, progress=False)
    fp, hs = dense[0]
    assert relative_error(_flat_score(fp, s), fp.theta * (hs.H_F @ fp.theta)) < RTOL


def test_no_batches_is_an_error():
    model, _, _ = dense_case("tanh_mlp")
    with pytest.raises(ValueError, match="no batches"):
        score(model, [], criterion="oba", progress=False)


def test_progress_bar_path_gives_the_same_scores():
    model, data, _ = dense_case("tanh_mlp")
    a = score(model, data, criterion="taylor", progress=True)
    b = score(model, data, criterion="taylor", progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_generated_program_path_gives_the_eager_scores(mode):
    model, data, dense = dense_case("res_bn_cnn", mode)
    s = score(model, data, criterion="oba", hessian="full", example_inputs=(data[0][0],), progress=False, mode=mode)
    ref = _mean([fp.theta * (hs.H @ fp.theta) for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


def test_program_from_the_codegen_pass_is_used(monkeypatch):
    model, data, dense = dense_case("se_gate")
    gm = torch.fx.symbolic_trace(model)
    HVPCodegen(data[0])(gm)
    calls = []
    original = HVPProgram.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HVPProgram, "__call__", counting)
    s = score(gm, data, criterion="oba", progress=False)
    assert len(calls) == len(data)
    ref = _mean([fp.theta * (hs.H_F @ fp.theta) for fp, hs in dense])
    assert relative_error(_flat_score(dense[0][0], s), ref) < RTOL


def test_scores_cover_every_parameter_with_its_shape_and_dtype():
    model, data, _ = dense_case("self_attention")
    s = score(model, data, criterion="oba", progress=False)
    params = dict(model.named_parameters())
    assert list(s) == list(params)
    assert all(s[n].shape == p.shape and s[n].dtype == p.dtype for n, p in params.items())
    assert all(math.isfinite(float(v.abs().max())) for v in s.values())


def test_fisher_accumulated_in_chunks_equals_one_chunk(monkeypatch):
    import oba_fx.estimators as estimators

    model, data, _ = dense_case("self_attention")
    whole = score(model, data, criterion="obd_fisher", progress=False)
    monkeypatch.setattr(estimators, "FISHER_CHUNK_ELEMENTS", 200)  # two samples per chunk
    chunked = score(model, data, criterion="obd_fisher", progress=False)
    # some tensors' Fisher scores are ~1e-37 (rounding noise): compare every tensor against an
    # absolute floor scaled to the largest score of the model, not against its own magnitude
    scale = max(float(t.abs().max()) for t in whole.values())
    assert scale > 0
    assert all(float((chunked[n] - whole[n]).abs().max()) <= 1e-12 * scale for n in whole)
