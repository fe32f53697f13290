"""The pruning driver: schedule arithmetic, stopping rule, caps, ignore, round_to,
min_channels and BatchNorm recalibration."""

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.report import compose_kept
from oba_fx.schedule import channel_ceiling, exponential_schedule, units_this_step


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


def test_exponential_schedule_matches_the_paper_formula():
    sched = exponential_schedule(0.55, 50)
    assert sched[-1] == pytest.approx(0.55) and sched[0] == pytest.approx(1 - 0.45 ** (1 / 50))
    assert all(a < b for a, b in zip(sched, sched[1:]))


def test_channel_ceiling_is_one_minus_point_nine_r():
    assert channel_ceiling(0.5) == pytest.approx(0.55) and channel_ceiling(0.7) == pytest.approx(0.37)


def test_units_this_step_never_negative():
    assert units_this_step(0.1, 100, 30) == 0 and units_this_step(0.4, 100, 30) == 10


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.5, steps=0)


def test_channel_target_in_steps_removes_the_scheduled_total():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.5, steps=3, verbose=False)
    r = out.meta["oba"]
    assert r["steps"] == 3 and r["units_removed"] == round(0.5 * 128)


def test_flops_target_stops_as_soon_as_it_is_met():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), target_flops=0.8, steps=10, verbose=False)
    r = out.meta["oba"]
    assert r["flops_after"] <= 0.8 * r["flops_before"]
    assert r["steps"] < 10  # a 20 % cut is reached long before the 55 % channel ceiling


def test_kept_indices_of_several_steps_are_in_the_original_numbering():
    m = _mlp()
    out = oba_fx.prune_graph(m, torch.randn(2, 8), channel_ratio=0.5, steps=3, verbose=False)
    kept = out.meta["oba"]["kept"]["2.weight"]
    w = m[2].weight.index_select(0, torch.tensor(kept[0])).index_select(1, torch.tensor(kept[1]))
    assert torch.equal(w, out.get_submodule("2").weight)


def test_compose_kept_maps_through_the_first_numbering():
    assert compose_kept({"w": {0: [1, 3, 5]}}, {"w": {0: [0, 2]}}) == {"w": {0: [1, 5]}}


def test_max_layer_ratio_caps_every_layer():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.45, max_layer_ratio=0.5)
    assert min(out.get_submodule("0").out_features, out.get_submodule("2").out_features) >= 32


def test_unreachable_target_says_so():
    with pytest.raises(ValueError, match="unreachable"):
        oba_fx.prune_graph(_mlp(), torch.randn(2, 8), target_flops=0.05, max_layer_ratio=0.5)


def test_ignored_module_keeps_its_outputs():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.4, ignore=["0"])
    assert out.get_submodule("0").out_features == 64 and out.get_submodule("2").out_features < 64


def test_round_to_keeps_multiples():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.3, round_to=8)
    assert out.get_submodule("0").out_features % 8 == 0 and out.get_submodule("2").out_features % 8 == 0


def test_min_channels_limits_what_a_channel_ratio_can_take():
    with pytest.raises(ValueError, match="min_channels"):
        oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.9, max_layer_ratio=0.99, min_channels=10)


def test_min_channels_is_honoured():
    out = oba_fx.prune_graph(_mlp(), torch.randn(2, 8), channel_ratio=0.8, max_layer_ratio=0.99,
                             min_channels=10)
    assert min(out.get_submodule("0").out_features, out.get_submodule("2").out_features) >= 10


def test_bn_recalibration_uses_the_calibration_inputs():
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    data = [(x, torch.zeros(16, dtype=torch.long))]
    plain = oba_fx.prune_graph(_cnn(), x[:2], channel_ratio=0.25, data=data, compensate=False,
                               bn_recalibration=False)
    recal = oba_fx.prune_graph(_cnn(), x[:2], channel_ratio=0.25, data=data, compensate=False)
    assert recal.meta["oba"]["bn_recalibrated"] and not plain.meta["oba"]["bn_recalibrated"]
    kept = recal.meta["oba"]["kept"]["0.weight"][0]
    mean = _cnn()[0](x).mean(dim=(0, 2, 3))[kept]
    assert torch.allclose(recal.get_submodule("1").running_mean, mean, atol=1e-5)
    assert not torch.allclose(plain.get_submodule("1").running_mean, mean, atol=1e-2)


def test_with_data_compensation_is_on_and_recalibration_off_by_default():
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    data = [(x, torch.zeros(16, dtype=torch.long))]
    out = oba_fx.prune_graph(_cnn(), x[:2], channel_ratio=0.25, data=data, verbose=False)
    r = out.meta["oba"]
    assert r["compensation"]["layers_refit"] >= 1 and not r["bn_recalibrated"]
    assert oba_fx.prune_graph(_cnn(), x[:2], channel_ratio=0.25).meta["oba"]["compensation"] is None
    with pytest.raises(ValueError, match="compensate=True re-fits layers on calibration inputs"):
        oba_fx.prune_graph(_cnn(), x[:2], channel_ratio=0.25, compensate=True)


def test_result_keeps_the_models_train_mode():
    m = _mlp().train()
    assert oba_fx.prune_graph(m, torch.randn(2, 8), channel_ratio=0.2).training


# ------------------------------------------------------------------------------------ rankings
class _TwoBranches(torch.nn.Module):
    """Two parallel branches whose units score alike; the 5x5 branch costs more per channel."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(3, 8, 5, padding=2)
        self.head = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _flat_scores(gm):
    return {n: torch.ones_like(p) for n, p in gm.named_parameters()}


def test_unit_flops_equal_the_flops_each_unit_saves_alone():
    import numpy as np
    from oba_fx.ops import count_flops, new_shape
    from oba_fx.passes.pipeline import analyze_model
    from oba_fx.select import unit_flops

    gm = analyze_model(_TwoBranches(), (torch.randn(1, 3, 8, 8),))
    c = gm.meta["oba.coupling"]
    cost = unit_flops(gm, c)
    full = count_flops(gm)
    for u in np.nonzero(c.prunable)[0]:
        removed = np.zeros(c.n_units, dtype=bool)
        removed[u] = True
        assert cost[u] == full - count_flops(gm, lambda n: new_shape(n, c, removed)) > 0
    assert cost[~c.prunable].sum() == 0


def test_per_flop_ranking_removes_the_costlier_units_first_when_scores_tie():
    from oba_fx.passes.pipeline import analyze_model, prune
    from oba_fx.select import Target

    x = torch.randn(1, 3, 8, 8)
    kept = {}
    for ranking in ("group_max", "per_flop"):
        gm = analyze_model(_TwoBranches(), (x,))
        out = prune(gm, (x,), _flat_scores(gm), Target("channels", 0.25, ranking=ranking))
        kept[ranking] = (out.get_submodule("a").out_channels, out.get_submodule("b").out_channels)
    assert kept["per_flop"] == (8, 4)       # the 4 removed units all come from the 5x5 branch
    assert sum(kept["group_max"]) == 12     # the same number goes either way
    with pytest.raises(ValueError, match="ranking must be one of"):
        Target("channels", 0.25, ranking="size")


class _CatNet(torch.nn.Module):
    """Two 8-channel branches concatenated: one coupling group, two layers."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.6])
def test_round_to_gives_every_layer_a_multiple_not_only_every_group(ratio):
    torch.manual_seed(0)
    net = _CatNet()
    with torch.no_grad():
        net.b.weight.mul_(0.3)  # branch b scores lower: L1 takes more from it than from a
    out = oba_fx.prune_graph(net, torch.randn(1, 3, 8, 8), channel_ratio=ratio, round_to=4, verbose=False)
    a, b = out.get_submodule("a").out_channels, out.get_submodule("b").out_channels
    assert a % 4 == 0 and b % 4 == 0 and a + b < 16


def test_residual_streams_are_kept_by_default_and_pruned_on_request():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    kept = oba_fx.prune_graph(model, x, channel_ratio=0.4, verbose=False)
    assert kept.meta["oba"]["target"]["keep_residual"]
    assert [kept.get_submodule(f"layer{i}.0.conv2").out_channels for i in (1, 2, 3, 4)] == [64, 128, 256, 512]
    assert all(kept.get_submodule(f"layer{i}.0.conv1").out_channels < w for i, w in zip((1, 2, 3, 4),
                                                                                       (64, 128, 256, 512)))
    free = oba_fx.prune_graph(model, x, channel_ratio=0.4, keep_residual=False, verbose=False)
    assert sum(free.get_submodule(f"layer{i}.0.conv2").out_channels for i in (1, 2, 3, 4)) < 960
