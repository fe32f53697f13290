"""Each criterion's default cross-group ranking, as chosen by ``benchmarks/ranking.py``: OBA's and
Taylor's loss change per FLOP saved, OBS's re-fit cost per coupling group, ``group_max`` for the rest;
an explicit ``ranking=`` always wins."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import oba_fx


def _net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    data = [(torch.randn(8, 3, 10, 10), torch.randint(0, 4, (8,))) for _ in range(2)]
    return net, data


@pytest.mark.parametrize("criterion, ranking", [("oba", "per_flop"), ("obs", "group_max"),
                                                ("taylor", "per_flop"), ("l1", "group_max")])
def test_default_ranking_of_each_criterion(criterion, ranking):
    net, data = _net_and_data()
    out = oba_fx.prune_graph(net, torch.randn(1, 3, 10, 10), criterion=criterion, data=data, target_flops=0.6,
                             verbose=False)
    assert out.meta["oba"]["target"]["ranking"] == ranking


def test_an_explicit_ranking_overrides_the_criterions_default():
    net, data = _net_and_data()
    out = oba_fx.prune_graph(net, torch.randn(1, 3, 10, 10), criterion="oba", data=data, target_flops=0.6,
                             ranking="group_max", verbose=False)
    assert out.meta["oba"]["target"]["ranking"] == "group_max"
