"""CAMP-HiVe: power iteration against dense float64 Hessians, the ``"camp"`` criterion, cyclic
pair merging (unstructured and structured, partner values checked exactly), unstructured masks
that hold through optimizer steps, save/load and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from hessian_oracle import dense_case, one_thread_per_test  # noqa: F401 (fixture)
from oba_fx.hvp import fused_hvp
from oba_fx.hessian_eigen import power_iteration


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


# ------------------------------------------------------------------------------ the criterion
def test_camp_criterion_is_one_power_iteration_over_all_batches():
    import oba_fx
    from oba_fx.criteria.camp import camp_importance

    model, data, _ = dense_case("tanh_mlp")
    s = oba_fx.score(model, data, criterion="camp", hessian="full", progress=False)
    r = power_iteration(model, data, k=1, iters=30, tol=1e-3, hessian="full", progress=False)
    want = camp_importance(r, {n: p.detach() for n, p in model.named_parameters()})
    for n in want:
        assert torch.allclose(s[n], want[n], rtol=0, atol=1e-12), n
    # not the mean of per-batch eigenvectors
    per = [oba_fx.score(model, [b], criterion="camp", hessian="full", progress=False) for b in data]
    assert any(not torch.allclose(s[n], (per[0][n] + per[1][n]) / 2, atol=1e-6) for n in s)


def test_whole_data_needs_data():
    from oba_fx.criteria import register_criterion

    with pytest.raises(ValueError, match="needs_data=True"):
        register_criterion("bad_whole", lambda ctx, b: {}, needs_data=False, whole_data=True)


def test_camp_importance_weighting_and_theta():
    from oba_fx.criteria.camp import camp_importance, curvature_share
    from oba_fx.hessian_eigen import PowerIterationResult

    v1 = {"a": torch.tensor([0.6, 0.0]), "b": torch.tensor([0.8])}
    v2 = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}
    r = PowerIterationResult((-3.0, 1.0), (v1, v2), (1, 1), (0.0, 0.0), (True, True), ("a", "b"))
    imp = camp_importance(r, {"a": torch.tensor([2.0, -1.0]), "b": torch.tensor([0.5])}, times_theta=True)
    assert torch.allclose(imp["a"], torch.tensor([0.75 * 0.6 * 2.0, 0.25 * 1.0 * 1.0]))
    assert torch.allclose(imp["b"], torch.tensor([0.75 * 0.8 * 0.5]))
    u = camp_importance(r, weighting="uniform")
    assert torch.allclose(u["a"], torch.tensor([0.3, 0.5]))
    sh = curvature_share(r)
    assert abs(sh["a"] - (0.75 * 0.36 + 0.25)) < 1e-6 and abs(sum(sh.values()) - 1.0) < 1e-6  # float32 inputs


# ------------------------------------------------------------------------------ merging
def test_unstructured_merge_partner_values_exact():
    from oba_fx.merging import merge_unstructured

    w = torch.arange(1.0, 13.0).view(3, 4)       # 1..12
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    out = merge_unstructured({"w": w}, {"w": keep}, fraction=0.5)["w"].view(-1)
    flat = w.view(-1)
    pruned = [1, 3, 4, 5, 9, 10, 11]
    kept = [0, 2, 6, 7, 8]
    want = flat.clone()
    for i, p in enumerate(pruned):
        want[kept[i % len(kept)]] += 0.5 * flat[p]
    want[pruned] = 0.0
    assert torch.equal(out, want)
    assert out[0] == 1 + 0.5 * (2 + 11) and out[2] == 3 + 0.5 * (4 + 12)   # two pruned entries each
    assert torch.equal(w.view(-1), torch.arange(1.0, 13.0))                # input untouched
    full = merge_unstructured({"w": w}, {"w": keep}, fraction=1.0)["w"]
    assert float(full.sum()) == float(w.sum())                              # fraction 1 conserves the sum
    with pytest.raises(ValueError, match="fraction"):
        merge_unstructured({"w": w}, {"w": keep}, fraction=1.5)


class _TwoConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.c2 = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.c2(h), 1).flatten(1))


def _scores_removing(model, rows):
    """l1-like scores that make exactly ``rows`` of c1 the least important."""
    s = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    s["c1.weight"][rows] = 1e-3
    return s


@pytest.mark.parametrize("mode", ["cyclic", "similar"])
def test_structured_merge_partner_values_exact(mode):
    from oba_fx.passes.pipeline import analyze_model, prune
    from oba_fx.select import Target

    torch.manual_seed(0)
    model = _TwoConv().eval()
    with torch.no_grad():
        if mode == "similar":   # channel 4 is a copy of channel 2 scaled, channel 1 of channel 5
            model.c1.weight[4] = 2 * model.c1.weight[2]
            model.c1.weight[1] = 3 * model.c1.weight[5]
            model.c1.bias[4], model.c1.bias[1] = 2 * model.c1.bias[2], 3 * model.c1.bias[5]
            model.bn.weight[4], model.bn.weight[1] = 2 * model.bn.weight[2], 3 * model.bn.weight[5]
            model.bn.bias[4], model.bn.bias[1] = 2 * model.bn.bias[2], 3 * model.bn.bias[5]
    x = torch.randn(2, 3, 8, 8)
    removed_rows = [1, 4]
    gm = analyze_model(model, (x,))
    out = prune(gm, (x,), _scores_removing(model, removed_rows), Target("channels", 0.2), merge=(mode, 0.5))  # 2 of 10 units
    kept = out.meta["oba"]["kept"]["c2.weight"][1]
    assert list(kept) == [0, 2, 3, 5]
    partner = {1: 0, 4: 2} if mode == "cyclic" else {1: 5, 4: 2}
    W = model.c2.weight.detach().clone()
    for r, p in partner.items():
        W[:, p] += 0.5 * model.c2.weight.detach()[:, r]
    assert torch.equal(out.get_submodule("c2").weight.detach(), W[:, kept])
    assert torch.equal(out.get_submodule("c1").weight.detach(), model.c1.weight.detach()[kept])
    assert out.meta["oba"]["merge"] == {"mode": mode, "fraction": 0.5, "pairs": 2, "consumer_dims": 1,
                                        "unmatched": 0}
    assert out.meta["oba"]["max_rel_error"] <= 1e-5    # slimmed == merged-masked (verified inside)


def test_structured_merge_residual_group_updates_every_consumer():
    from oba_fx.merging import merge_structured
    from oba_fx.passes.pipeline import analyze_model

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4)
            self.b = torch.nn.Linear(4, 4)
            self.c = torch.nn.Linear(4, 2)
            self.d = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h = h + self.b(torch.tanh(h))
            return self.c(h) + self.d(torch.relu(h))

    torch.manual_seed(0)
    m = Res()
    gm = analyze_model(m, (torch.randn(2, 3),))
    c = gm.meta["oba.coupling"]
    s = c.param_spaces[("a.weight", 0)]
    removed = torch.zeros(c.n_units, dtype=torch.bool).numpy()
    removed[c.units_of(s)[3]] = True            # the residual channel 3
    rec = merge_structured(gm, c, removed, mode="cyclic", fraction=0.5)
    assert len(rec.pairs) == 1
    for name in ("b", "c", "d"):                 # every consumer of the stream: column 0 += ½ column 3
        W0 = getattr(m, name).weight.detach()
        W1 = gm.get_submodule(name).weight.detach()
        assert torch.equal(W1[:, 0], W0[:, 0] + 0.5 * W0[:, 3])
        assert torch.equal(W1[:, 1:], W0[:, 1:])
    assert sorted(rec.columns) == ["b.weight:1", "c.weight:1", "d.weight:1"]


def test_prune_graph_camp_merge_verified():
    import functools
    import oba_fx
    from oba_fx.criteria import register_criterion, unregister_criterion
    from oba_fx.criteria.camp import camp

    torch.manual_seed(0)
    model = _TwoConv().eval()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,)))]
    register_criterion("camp_t5", functools.partial(camp, iters=5), needs_data=True, whole_data=True)
    try:
        out = oba_fx.prune_graph(model, torch.randn(1, 3, 8, 8), criterion="camp_t5", data=data, channel_ratio=0.4,
                                 merge="similar", verbose=False, bn_recalibration=False)
    finally:
        unregister_criterion("camp_t5")
    assert out.meta["oba"]["merge"]["pairs"] > 0 and out.meta["oba"]["max_rel_error"] <= 1e-4
    with pytest.raises(ValueError, match="merge must be"):
        oba_fx.prune_graph(model, torch.randn(1, 3, 8, 8), channel_ratio=0.4, merge="nearest")
