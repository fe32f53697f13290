"""Structured curvature-adaptive thresholds (``ranking="curvature"``, issue #11 item 2): one claim per test.

Each coupling group's removal fraction follows its relative flatness ``(mean density / its
density)^β`` of unit score (for ``"camp"``: of the λ-weighted eigenvector importance); the caps
and the FLOPs search are the other rankings'.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.criteria import register_criterion, unregister_criterion
from oba_fx.criteria.camp import camp
from oba_fx.passes import ScorePass
from oba_fx.passes.pipeline import analyze_model
from oba_fx.select import CURVATURE_BETA, curvature_keys, unit_flops, unit_scores


def _net() -> nn.Module:
    """Two hidden layers of 16; the second's weights ×0.1 (and the head's ×10): with the default
    functional Hessian the first layer then holds about 80 % of the camp unit scores."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        net[2].weight.mul_(0.1)
        net[4].weight.div_(0.1)
    return net


def _data() -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(2)]


@pytest.fixture(autouse=True)
def _quiet_power_iteration():
    logging.disable(logging.WARNING)  # camp warns when 30 products do not reach tol on these toys
    yield
    logging.disable(logging.NOTSET)


def test_removals_split_as_the_groups_relative_flatness():
    group = np.repeat([0, 1], 16)
    rng = np.random.default_rng(0)
    scores = np.concatenate([0.8 / 16 * rng.uniform(0.5, 1.5, 16), 0.2 / 16 * rng.uniform(0.5, 1.5, 16)])
    gone = np.argsort(curvature_keys(group, scores, beta=0.5))[:16]
    # flatness r_g = (mean density / density)^½ is 0.79 and 1.58 (density ratio 4 up to the noise):
    # removed fractions 1 : 2 of 16 removals, i.e. 5 and 11 after rounding
    assert np.bincount(group[gone], minlength=2).tolist() == [5, 11]


def test_within_a_group_the_lowest_scores_go_first():
    group = np.array([0, 0, 0, 1, 1])
    keys = curvature_keys(group, np.array([3.0, 1.0, 2.0, 5.0, 4.0]))
    assert np.argsort(keys[:3]).tolist() == [1, 2, 0] and keys[4] < keys[3]


def test_unranked_units_stay_unranked_and_a_zero_group_goes_first():
    keys = curvature_keys(np.array([0, 0, 1, 1, 2]), np.array([0.0, 0.0, 1.0, 2.0, np.nan]))
    assert np.isnan(keys[4]) and keys[:2].max() <= 1e-12 < keys[2:4].min()


def test_camp_sharp_layer_keeps_more_units_than_the_flat_one():
    net, data = _net(), _data()
    gm = analyze_model(net, (data[0][0][:2],))
    ScorePass("camp", data, progress=False)(gm)
    c = gm.meta["oba.coupling"]
    us = unit_scores(c, gm.meta["oba.scores"], "global")
    h1, h2 = (np.unique(c.group[c.units_of(c.param_spaces[(w, 0)])])[0] for w in ("0.weight", "2.weight"))
    share1 = us[c.group == h1].sum() / np.nansum(us)
    assert share1 > 0.7  # the first hidden layer holds most of the curvature
    out = oba_fx.prune_graph(net, data[0][0][:2], criterion="camp", data=data, channel_ratio=0.5,
                             ranking="curvature", verbose=False)
    kept1, kept2 = out.get_submodule("0").out_features, out.get_submodule("2").out_features
    assert kept1 + kept2 == 16 and kept1 > kept2
    # closed form of the split: removed fractions p_g ∝ (mean density / density_g)^β, Σ = 16 units
    r1, r2 = ((0.5 / s) ** CURVATURE_BETA for s in (share1, 1 - share1))
    assert abs((16 - kept1) - 16 * r1 / (r1 + r2)) <= 1.0


def test_flops_target_is_met_by_the_smallest_removal():
    net, data = _net(), _data()
    out = oba_fx.prune_graph(net, data[0][0][:2], criterion="camp", data=data, target_flops=0.5,
                             ranking="curvature", verbose=False)
    r = out.meta["oba"]
    gm = analyze_model(net, (data[0][0][:2],))
    step = unit_flops(gm, gm.meta["oba.coupling"]).max()
    budget = 0.5 * r["flops_before"]
    assert budget - step < r["flops_after"] <= budget
    assert r["target"]["ranking"] == "curvature"


def test_slimmed_equals_masked_with_compensation():
    net, data = _net(), _data()
    out = oba_fx.prune_graph(net, data[0][0][:2], criterion="camp", data=data, target_flops=0.5,
                             ranking="curvature", verbose=False)
    assert out.meta["oba"]["compensation"]["layers_refit"] >= 2 and out.meta["oba"]["max_rel_error"] <= 1e-4


def test_shares_are_re_estimated_at_every_step():
    calls = []

    def counted(ctx, batches):
        calls.append(ctx.params["0.weight"].shape[0])
        return camp(ctx, batches)

    register_criterion("camp_counted", counted, needs_data=True, needs_hvp=True, per_batch=False)
    try:
        oba_fx.prune_graph(_net(), _data()[0][0][:2], criterion="camp_counted", data=_data(), channel_ratio=0.5,
                           steps=2, ranking="curvature", verbose=False)
    finally:
        unregister_criterion("camp_counted")
    assert len(calls) == 2 and calls[1] < calls[0]  # step 2 scores the slimmed network
