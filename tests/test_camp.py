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
    want = camp_importance(r, {n: p.detach() for n, p in model.named_parameters()}, times_theta=True)
    for n in want:
        assert torch.allclose(s[n], want[n], rtol=0, atol=1e-12), n
    # not the mean of per-batch eigenvectors
    per = [oba_fx.score(model, [b], criterion="camp", hessian="full", progress=False) for b in data]
    assert any(not torch.allclose(s[n], (per[0][n] + per[1][n]) / 2, atol=1e-6) for n in s)


def test_whole_data_needs_data():
    from oba_fx.criteria import register_criterion

    with pytest.raises(ValueError, match="needs_data=True"):
        register_criterion("bad_whole", lambda ctx, b: {}, needs_data=False, per_batch=False)


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
    register_criterion("camp_t5", functools.partial(camp, iters=5), needs_data=True, per_batch=False)
    try:
        out = oba_fx.prune_graph(model, torch.randn(1, 3, 8, 8), criterion="camp_t5", data=data, channel_ratio=0.4,
                                 merge="similar", verbose=False, bn_recalibration=False)
    finally:
        unregister_criterion("camp_t5")
    assert out.meta["oba"]["merge"]["pairs"] > 0 and out.meta["oba"]["max_rel_error"] <= 1e-4
    with pytest.raises(ValueError, match="merge must be"):
        oba_fx.prune_graph(model, torch.randn(1, 3, 8, 8), channel_ratio=0.4, merge="nearest")


# ------------------------------------------------------------------------------ unstructured masks
def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def _zeros_hold(gm, masks):
    from oba_fx.unstructured import masks_of

    got = masks_of(gm)
    assert set(got) == set(masks)
    for n, m in masks.items():
        mod, _, attr = n.rpartition(".")
        w = getattr(gm.get_submodule(mod), attr)
        assert torch.equal(got[n], m)
        assert bool((w[~m] == 0).all()), n
        assert bool((w[m] != 0).any()), n


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_masks_hold_through_optimizer_steps(opt):
    from oba_fx.unstructured import masks_of, prune_unstructured

    gm = prune_unstructured(_small_net(), None, criterion="magnitude", sparsity=0.8, progress=False)
    masks = masks_of(gm)
    gm.train()
    o = (torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4) if opt == "sgd"
         else torch.optim.Adam(gm.parameters(), lr=0.1))
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    for x, y in _data(5):
        o.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), y).backward()
        o.step()
    assert any(not torch.equal(before[n], p) for n, p in gm.named_parameters())  # it did train
    _zeros_hold(gm, masks)


def test_masks_hold_through_save_load(tmp_path):
    import oba_fx
    from oba_fx.unstructured import masks_of, prune_unstructured

    gm = prune_unstructured(_small_net(), _data(), criterion="taylor", sparsity=0.6, progress=False)
    p = oba_fx.save(gm, tmp_path / "m.pt")
    back = oba_fx.load(p)
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(back(x), gm(x))
    assert back.meta["oba"] == gm.meta["oba"]
    _zeros_hold(back, masks_of(gm))
    back.train()
    o = torch.optim.SGD(back.parameters(), lr=0.5)
    x, y = _data(1)[0]
    torch.nn.functional.cross_entropy(back(x), y).backward()
    o.step()
    _zeros_hold(back, masks_of(gm))   # the loaded masks are live parametrizations
    gm(x)                             # saving did not break the original (shared parametrized class)


def test_masks_hold_under_torch_compile():
    from oba_fx.unstructured import masks_of, prune_unstructured

    gm = prune_unstructured(_small_net(), None, criterion="l1", sparsity=0.7, progress=False)
    masks = masks_of(gm)
    x, y = _data(1)[0]
    eager = gm(x)
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=False)
    assert torch.allclose(compiled(x), eager, atol=1e-6)
    gm.train()
    o = torch.optim.SGD(gm.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        o.zero_grad()
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        o.step()
    _zeros_hold(gm, masks)


def test_make_masks_permanent():
    from oba_fx.unstructured import make_masks_permanent, masks_of, prune_unstructured
    from torch.nn.utils import parametrize

    gm = prune_unstructured(_small_net(), None, criterion="l1", sparsity=0.5, progress=False)
    masks = masks_of(gm)
    x = torch.randn(2, 3, 4, 4)
    y0 = gm(x)
    make_masks_permanent(gm)
    assert not any(parametrize.is_parametrized(m) for m in gm.modules()) and masks_of(gm) == {}
    assert torch.equal(gm(x), y0)
    assert bool((gm.get_submodule("0").weight[~masks["0.weight"]] == 0).all())
    assert sorted(n for n, _ in gm.named_parameters()) == sorted(n for n, _ in _small_net().named_parameters())


# ------------------------------------------------------------------------------ prune_unstructured
def test_sparsity_report_and_scopes():
    from oba_fx.unstructured import prune_unstructured

    m = _small_net()
    g = prune_unstructured(m, None, criterion="l1", sparsity=0.75, scope="global", progress=False)
    rep = g.meta["oba"]
    assert rep["total"] == {"numel": 8 * 27 + 5 * 128, "zeros": round(0.75 * (8 * 27 + 5 * 128)), "sparsity":
                            round(round(0.75 * 856) / 856, 6)}
    w_all = torch.cat([m[0].weight.abs().flatten(), m[4].weight.abs().flatten()])
    thr = w_all.sort().values[round(0.75 * 856) - 1]
    for n, mod in (("0.weight", m[0]), ("4.weight", m[4])):     # global threshold on |θ|
        pruned = g.get_submodule(n[0]).weight == 0
        assert torch.equal(pruned, mod.weight.abs() <= thr)
        assert rep["layers"][n]["zeros"] == int(pruned.sum())
    lay = prune_unstructured(m, None, criterion="l1", sparsity=0.5, scope="layer", progress=False).meta["oba"]
    assert lay["layers"]["0.weight"]["zeros"] == 108 and lay["layers"]["4.weight"]["zeros"] == 320
    assert sorted(n for n, _ in m.named_parameters()) == ["0.bias", "0.weight", "1.bias", "1.weight", "4.bias",
                                                          "4.weight"]      # the model is untouched
    assert not any(isinstance(type(x), type) and type(x).__name__.startswith("Parametrized") for x in m.modules())


@pytest.mark.parametrize("criterion", ["camp", "oba", "taylor", "magnitude"])
def test_prune_unstructured_every_criterion(criterion):
    from oba_fx.unstructured import prune_unstructured

    m = _small_net().double()
    data = [(x.double(), y) for x, y in _data()]
    gm = prune_unstructured(m, data, criterion=criterion, sparsity=0.6, iters=10, progress=False)
    assert abs(gm.meta["oba"]["total"]["sparsity"] - 0.6) < 2e-3
    assert gm.meta["oba"]["criterion"] == ("l1" if criterion == "magnitude" else criterion)


def test_camp_adaptive_steps_and_merge():
    from oba_fx.hessian_eigen import power_iteration
    from oba_fx.unstructured import masks_of, prune_unstructured

    m = _small_net().double()
    data = [(x.double(), y) for x, y in _data()]
    gm = prune_unstructured(m, data, criterion="camp", sparsity=0.8, scope="adaptive", steps=2, merge=True,
                            iters=10, progress=False)
    rep = gm.meta["oba"]
    assert abs(rep["total"]["sparsity"] - 0.8) < 2e-3 and len(rep["power_iteration"]) == 2   # re-estimated
    fr = {n: r["sparsity"] for n, r in rep["layers"].items()}
    assert all(0.4 - 1e-3 <= f <= 0.9 + 1e-3 for f in fr.values())      # default caps (s/2, (1+s)/2)
    # the second power iteration ran on the kept coordinates only: its vector is zero on the pruned ones
    masks = masks_of(gm)
    r = power_iteration(gm, data, k=1, iters=3, masks={f"{n.rsplit('.', 1)[0]}.parametrizations.weight.original": k
                                                        for n, k in masks.items()}, progress=False)
    v = r.eigenvectors[0]
    assert all(float(v[f"{n.rsplit('.', 1)[0]}.parametrizations.weight.original"][~k].abs().max()) == 0
               for n, k in masks.items())


def test_merge_moves_pruned_mass_into_partners():
    from oba_fx.unstructured import prune_unstructured

    m = _small_net()
    a = prune_unstructured(m, None, criterion="l1", sparsity=0.5, scope="layer", progress=False)
    b = prune_unstructured(m, None, criterion="l1", sparsity=0.5, scope="layer", merge=True, merge_fraction=1.0,
                           progress=False)
    for n in ("0", "4"):
        wa, wb, w0 = (x.get_submodule(n).weight.detach() for x in (a, b, m))
        assert torch.equal(wa == 0, wb == 0)                                  # same masks
        assert torch.allclose(wb.sum(), w0.sum(), atol=1e-4)                  # fraction 1 keeps each tensor's sum
        assert not torch.equal(wa, wb)


def test_adaptive_fractions():
    from oba_fx.unstructured import adaptive_fractions

    sizes = {"a": 100, "b": 300, "c": 600}
    f = adaptive_fractions({"a": 0.7, "b": 0.2, "c": 0.1}, sizes, 0.6)
    assert abs(sum(f[n] * sizes[n] for n in f) - 600) < 1e-6
    assert f["a"] < f["b"] < f["c"] and all(0.3 - 1e-12 <= x <= 0.8 + 1e-12 for x in f.values())
    flat = adaptive_fractions({"a": 0.7, "b": 0.2, "c": 0.1}, sizes, 0.6, beta=0.0)
    assert all(abs(x - 0.6) < 1e-9 for x in flat.values())
    with pytest.raises(ValueError, match="caps"):
        adaptive_fractions({"a": 1.0}, {"a": 10}, 0.5, caps=(0.6, 0.9))


def test_prune_unstructured_errors():
    from oba_fx.unstructured import prune_unstructured

    m = _small_net()
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_unstructured(m, None, criterion="camp", sparsity=0.5)
    with pytest.raises(ValueError, match="needs criterion='camp'"):
        prune_unstructured(m, None, criterion="l1", sparsity=0.5, scope="adaptive")
    with pytest.raises(ValueError, match="sparsity must be in"):
        prune_unstructured(m, None, criterion="l1", sparsity=1.0)
    with pytest.raises(ValueError, match="unknown criterion"):
        prune_unstructured(m, None, criterion="gradnorm", sparsity=0.5)


# ------------------------------------------------------------------------------ structured camp on the zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small",
                                  "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf", "efficientnet_b0",
                                  "densenet121", "googlenet", "convnext_tiny"])
def test_structured_camp_merge_verified_on_zoo_fast_subset(name):
    """The fast subset of tests/test_zoo.py: structured camp with cyclic merging; the pipeline
    verifies slimmed == merged-masked on every model (VerifyPass raises otherwise)."""
    import functools
    import torchvision
    import oba_fx
    from _oracle import randomize
    from oba_fx.criteria import register_criterion, unregister_criterion
    from oba_fx.criteria.camp import camp
    from test_zoo import FAST, input_size

    assert name in FAST
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None)).eval()
    s = input_size(name)
    x = torch.randn(2, 3, s, s)
    data = [(x, torch.randint(0, 1000, (2,)))]
    register_criterion("camp_zoo", functools.partial(camp, iters=2), needs_data=True, per_batch=False, replace=True)
    try:
        out = oba_fx.prune_graph(model, x, criterion="camp_zoo", data=data, channel_ratio=0.3, merge="cyclic",
                                 verbose=False, bn_recalibration=False)
    finally:
        unregister_criterion("camp_zoo")
    rep = out.meta["oba"]
    assert rep["merge"]["pairs"] > 0 and rep["merge"]["consumer_dims"] > 0
    assert rep["max_rel_error"] <= 1e-4
    assert rep["flops_after"] < rep["flops_before"]


def test_cli_prune_unstructured_camp(capsys, data_dir, tmp_path):
    import oba_fx
    from oba_fx.cli import main
    from oba_fx.unstructured import masks_of

    out = tmp_path / "r20.pt"
    code = main(["prune", "--model", "resnet20", "--data", str(data_dir), "--unstructured", "--sparsity", "0.9",
                 "--criterion", "camp", "--calib-batches", "1", "--batch-size", "8", "--test-limit", "20",
                 "--bn-recal", "off", "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "weights pruned (0.900)" in text and "layer3.2.conv2.weight" in text
    back = oba_fx.load(out)
    assert back.meta["oba"]["criterion"] == "camp" and len(masks_of(back)) == 20
    code = main(["prune", "--model", "resnet20", "--data", str(data_dir), "--unstructured", "--criterion", "l1"])
    assert code != 0 and "--sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("hessian", ["full", "functional"])
def test_double_backward_fallback_matches_dense(hessian, monkeypatch):
    """The reverse-over-reverse fallback (models whose kernels lack forward-mode derivatives of
    their backward) gives the dense eigenpairs too."""
    import oba_fx.hessian_eigen as he

    def no_forward_ad(*a, **k):
        raise NotImplementedError("Trying to use forward AD with aten::hardsigmoid_backward that does not support it.")

    monkeypatch.setattr(he, "fused_hvp", no_forward_ad)
    model, data, dense = dense_case("gelu_layernorm")
    H = sum(h.H if hessian == "full" else h.H_F for _, h in dense) / len(dense)
    lam, V = _dense_top(H, 2)
    r = he.power_iteration(model, data, k=2, iters=2000, tol=1e-10, hessian=hessian, progress=False)
    for j in range(2):
        assert abs(r.eigenvalues[j] - float(lam[j])) <= 1e-6 * abs(float(lam[j]))
        v = dense[0][0].flatten(r.eigenvectors[j])
        assert float((torch.sign(v @ V[:, j]) * v - V[:, j]).abs().max()) < 1e-6
