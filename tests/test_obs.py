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


def _oracle_cost(model: nn.Module, data, j: int) -> float:
    """½ Σ_o G_o · mean-row residual of re-fitting layer 2 without its input feature j."""
    x, y = data[0]
    h = model[1](model[0](x)).detach()
    z = model[2](h).detach().requires_grad_()
    loss = nn.functional.cross_entropy(z, y)
    g = torch.autograd.grad(loss, z)[0] * x.shape[0]
    G = g.square().mean(0)
    keep = [i for i in range(h.shape[1]) if i != j]
    W = model[2].weight.detach()
    target = h @ W.T                                   # the dense output (bias aside)
    sol = torch.linalg.lstsq(h[:, keep], target).solution
    resid = (h[:, keep] @ sol - target).square().mean(0)
    return 0.5 * float((G * resid).sum())


def test_obs_cost_equals_an_explicit_least_squares_refit(monkeypatch):
    monkeypatch.setattr(obs_mod, "RIDGE", 0.0)
    model, data = _mlp(), _data()
    gm = analyze_model(model, (data[0][0][:1],))
    costs = score(gm, data, criterion="obs", progress=False)
    got = costs[("2.weight", 1)]
    want = torch.tensor([_oracle_cost(model, data, j) for j in range(6)], dtype=torch.float64)
    assert float((got - want).abs().max()) <= 1e-8 * float(want.abs().max())
    assert float(want.min()) > 0


def test_a_duplicated_channel_costs_nothing_because_the_refit_absorbs_it(monkeypatch):
    monkeypatch.setattr(obs_mod, "RIDGE", 0.0)
    model, data = _mlp(), _data()
    with torch.no_grad():  # hidden neuron 5 copies neuron 0 exactly
        model[0].weight[5] = model[0].weight[0]
        model[0].bias[5] = model[0].bias[0]
        model[2].weight[:, 5] = torch.randn(3, dtype=torch.float64)
    monkeypatch.setattr(obs_mod, "RIDGE", 1e-12)  # the copy makes the second moment singular
    gm = analyze_model(model, (data[0][0][:1],))
    cost = score(gm, data, criterion="obs", progress=False)[("2.weight", 1)]
    assert float(cost[5]) < 1e-6 * float(cost[1:5].min())


def test_obs_needs_the_coupling_and_says_how_to_get_it():
    with pytest.raises(ValueError, match="use it through oba_fx.prune_graph"):
        score(_mlp(), _data(), criterion="obs", progress=False)


def test_obs_ranks_globally_and_prunes_a_cnn_to_target_verified():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(2)]
    out = oba_fx.prune_graph(net, torch.randn(1, 3, 12, 12), criterion="obs", data=data, target_flops=0.6,
                             verbose=False)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.6 * r["flops_before"] and r["max_rel_error"] < 1e-4
    assert r["target"]["ranking"] == "global"
    gm = analyze_model(net, (torch.randn(1, 3, 12, 12),))
    costs = score(gm, data, criterion="obs", progress=False)
    assert {k for k in costs} == {("0.weight", 1), ("3.weight", 0), ("5.weight", 1), ("9.weight", 1)}
    assert all(bool((v >= 0).all()) and bool(torch.isfinite(v).all()) for v in costs.values())
    assert M.COUPLING in gm.meta
