"""CAMP-HiVe: power iteration against dense float64 Hessians, the ``"camp"`` criterion, cyclic
pair merging (unstructured and structured, partner values checked exactly), unstructured masks
that hold through optimizer steps, save/load and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from hessian_oracle import dense_case, one_thread_per_test  # noqa: F401 (fixture)
from oba_fx.hvp import fused_hvp
from oba_fx.power_iteration import power_iteration


def _flat(fp, vec: dict) -> torch.Tensor:
    return fp.flatten(vec)


def _dense_top(H: torch.Tensor, k: int):
    ev, V = torch.linalg.eigh(H)
    order = ev.abs().argsort(descending=True)[:k]
    return ev[order], V[:, order]


# ------------------------------------------------------------------------------ power iteration
@pytest.mark.parametrize("name,hessian", [("tanh_mlp", "full"), ("gelu_layernorm", "functional"),
                                          ("res_bn_cnn", "full")])
def test_power_iteration_matches_dense_top3(name, hessian):
    model, data, dense = dense_case(name)
    H = sum(h.H if hessian == "full" else h.H_F for _, h in dense) / len(dense)
    lam, V = _dense_top(H, 3)
    r = power_iteration(model, data, k=3, iters=2000, tol=1e-10, hessian=hessian, seed=1, progress=False)
    fp = dense[0][0]
    assert r.converged == (True, True, True), r.report()
    for j in range(3):
        assert abs(r.eigenvalues[j] - float(lam[j])) <= 1e-6 * abs(float(lam[j])), (j, r.eigenvalues, lam)
        v = _flat(fp, r.eigenvectors[j])
        assert abs(float(v.norm()) - 1.0) < 1e-12          # normalised across all parameters
        s = torch.sign(v @ V[:, j])
        assert float((s * v - V[:, j]).abs().max()) < 1e-6, j   # equal up to sign
        # the reported residual is ‖Hv − λv‖ on the dense H
        assert abs(float((H @ v - r.eigenvalues[j] * v).norm()) - r.residuals[j]) < 1e-9
    # orthonormal
    G = torch.stack([_flat(fp, e) for e in r.eigenvectors])
    assert torch.allclose(G @ G.T, torch.eye(3, dtype=G.dtype), atol=1e-10)
    rep = r.report()
    assert rep["k"] == 3 and rep["hvp_products"] == sum(r.iterations)
    assert all(p["relative_residual"] <= 1e-10 for p in rep["pairs"])


def test_power_iteration_masks_restrict_the_hessian():
    model, data, dense = dense_case("tanh_mlp")
    fp = dense[0][0]
    H = sum(h.H for _, h in dense) / len(dense)
    gen = torch.Generator().manual_seed(3)
    masks = {n: (torch.rand(p.shape, generator=gen) > 0.4).double() for n, p in model.named_parameters()}
    m = fp.flatten(masks).bool()
    lam, _ = _dense_top(H[m][:, m], 2)
    r = power_iteration(model, data, k=2, iters=3000, tol=1e-10, masks=masks, progress=False)
    assert all(r.converged)
    for j in range(2):
        assert abs(r.eigenvalues[j] - float(lam[j])) <= 1e-6 * abs(float(lam[j]))
        v = fp.flatten(r.eigenvectors[j])
        assert float(v[~m].abs().max()) == 0.0


def test_power_iteration_is_seeded_and_leaves_the_model_alone():
    model, data, _ = dense_case("res_bn_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = power_iteration(model, data, k=1, iters=5, tol=0.0, seed=7, progress=False)
    b = power_iteration(model, data, k=1, iters=5, tol=0.0, seed=7, progress=False)
    assert a.eigenvalues == b.eigenvalues and a.iterations == (6,) and a.converged == (False,)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_power_iteration_errors():
    model, data, _ = dense_case("tanh_mlp")
    with pytest.raises(ValueError, match="calibration data"):
        power_iteration(model, None)
    with pytest.raises(ValueError, match="no batches"):
        power_iteration(model, [])
    with pytest.raises(ValueError, match="unknown hessian"):
        power_iteration(model, data, hessian="gn")
    with pytest.raises(ValueError, match="has shape"):
        power_iteration(model, data, masks={"fc1.weight": torch.ones(2)})


def test_power_iteration_converges_on_resnet56(data_dir):
    from oba_fx.data import cifar10_loader
    from oba_fx.models import get_model

    model = get_model("resnet56", weights=next((data_dir / "weights").glob("resnet56-*.th"))).eval()
    x, y = next(iter(cifar10_loader(data_dir, "train", 16, shuffle=True, seed=0)))
    r = power_iteration(model, [(x, y)], k=1, iters=60, tol=1e-3, progress=False)
    assert r.converged == (True,), r.report()
    assert r.iterations[0] <= 60 and r.eigenvalues[0] > 0
    # the residual it reports is what an independent product gives
    v = r.eigenvectors[0]
    hv = fused_hvp(model, (x, y), hessian="full", tangents=v).hvps
    res = sum((hv[n] - r.eigenvalues[0] * v[n]).square().sum() for n in v).sqrt()
    assert abs(float(res) - r.residuals[0]) <= 1e-3 * r.eigenvalues[0]
    assert float(res) <= 1e-3 * r.eigenvalues[0] * 1.01
