"""The ``"obs"`` criterion: the Fisher-weighted output error left after a least-squares re-fit,
checked against an explicit re-fit (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import oba_fx
import oba_fx.criteria.obs as obs_mod
from oba_fx import meta as M
from oba_fx.passes.pipeline import analyze_model
from oba_fx.scoring import score


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))]


def _residual(model: nn.Module, data, removed: list[int]) -> float:
    """½ Σ_o G_o · mean-row residual of re-fitting layer 2 without its input features ``removed``."""
    x, y = data[0]
    h = model[1](model[0](x)).detach()
    z = model[2](h).detach().requires_grad_()
    g = torch.autograd.grad(nn.functional.cross_entropy(z, y), z)[0] * x.shape[0]
    G = g.square().mean(0)
    keep = [i for i in range(h.shape[1]) if i not in removed]
    target = h @ model[2].weight.detach().T             # the dense output (bias aside)
    sol = torch.linalg.lstsq(h[:, keep], target).solution
    return 0.5 * float((G * (h[:, keep] @ sol - target).square().mean(0)).sum())


def _oracle_greedy(model: nn.Module, data, n: int) -> list[float]:
    """Greedy removal by explicit re-fits; each unit's cost is the running maximum of the marginal
    residual increases up to its removal."""
    removed: list[int] = []
    cost = [0.0] * n
    running, base = 0.0, 0.0
    for _ in range(n):
        trials = {j: _residual(model, data, removed + [j]) for j in range(n) if j not in removed}
        j = min(trials, key=trials.get)
        running = max(running, trials[j] - base)
        cost[j], base = running, trials[j]
        removed.append(j)
    return cost


def test_obs_costs_equal_a_greedy_sequence_of_explicit_least_squares_refits(monkeypatch):
    monkeypatch.setattr(obs_mod, "RIDGE", 0.0)
    model, data = _mlp(), _data()
    gm = analyze_model(model, (data[0][0][:1],))
    got = score(gm, data, criterion="obs", progress=False)[("2.weight", 1)]
    want = torch.tensor(_oracle_greedy(model, data, 6), dtype=torch.float64)
    assert float((got - want).abs().max()) <= 1e-7 * float(want.abs().max())
    assert float(want.min()) > 0


def test_a_duplicated_channel_costs_nothing_because_the_refit_absorbs_it(monkeypatch):
    model, data = _mlp(), _data()
    with torch.no_grad():  # hidden neuron 5 copies neuron 0 exactly
        model[0].weight[5] = model[0].weight[0]
        model[0].bias[5] = model[0].bias[0]
        model[2].weight[:, 5] = torch.randn(3, dtype=torch.float64)
    monkeypatch.setattr(obs_mod, "RIDGE", 1e-12)  # the copy makes the second moment singular
    gm = analyze_model(model, (data[0][0][:1],))
    cost = score(gm, data, criterion="obs", progress=False)[("2.weight", 1)]
    assert min(float(cost[0]), float(cost[5])) < 1e-6 * float(cost.max())


def test_obs_needs_the_coupling_and_says_how_to_get_it():
    with pytest.raises(ValueError, match="use it through oba_fx.prune_graph"):
        score(_mlp(), _data(), criterion="obs", progress=False)


def test_obs_ranks_per_group_by_default_and_prunes_a_cnn_to_target_verified():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(2)]
    out = oba_fx.prune_graph(net, torch.randn(1, 3, 12, 12), criterion="obs", data=data, target_flops=0.6,
                             verbose=False)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.6 * r["flops_before"] and r["max_rel_error"] < 1e-4
    assert r["target"]["ranking"] == "group_max"
    gm = analyze_model(net, (torch.randn(1, 3, 12, 12),))
    costs = score(gm, data, criterion="obs", progress=False)
    assert {k for k in costs} == {("0.weight", 1), ("3.weight", 0), ("5.weight", 1), ("9.weight", 1)}
    assert all(bool((v >= 0).all()) and bool(torch.isfinite(v).all()) for v in costs.values())
    assert M.COUPLING in gm.meta
