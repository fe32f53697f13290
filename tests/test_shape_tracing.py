"""Shape-aware tracing: control flow on sizes traces with the example shapes; on data it is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.errors import TraceError
from oba_fx.tracing import trace


class ShapeBranch(nn.Module):
    """``if`` on a size, ``range`` over the batch, ``len`` and ``size(1) // 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.c1(x)).relu()
        if x.shape[-1] > 4:
            y = self.c2(y)
        for _ in range(x.shape[0]):
            y = y + 1
        y = y.mean((2, 3))[:, : y.size(1) // 2]
        return self.fc(y) * len(x)


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


def test_shape_dependent_if_traces_and_prunes_verified():
    m, x = ShapeBranch(), torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(m, (x,), channel_ratio=0.3, verbose=False, bn_recalibration=False)
    r = out.meta["oba"]
    assert r["flops_after"] < r["flops_before"] and r["max_rel_error"] <= 1e-4
    assert out.get_submodule("c2").out_channels < 8  # the branch taken (width 8 > 4) is in the graph


def test_the_report_and_the_graph_say_specialised_to_the_example_shapes():
    x = torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(ShapeBranch(), (x,), channel_ratio=0.3, verbose=False)
    spec = out.meta["oba"]["specialised"]
    assert spec["input_shapes"] == [[2, 3, 8, 8]] and "x.shape[-1] > 4" in spec["at"]
    assert out.meta["oba.specialised"] == spec


def test_a_multi_step_run_stays_specialised():
    x = torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(ShapeBranch(), (x,), target_flops=0.6, steps=2, verbose=False)
    assert out.meta["oba"]["steps"] == 2 and out.meta["oba"]["specialised"]["input_shapes"] == [[2, 3, 8, 8]]


def test_a_traceable_model_is_not_specialised():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    out = oba_fx.prune_graph(m, (torch.randn(2, 4),), channel_ratio=0.3, verbose=False)
    assert out.meta["oba"]["specialised"] is None


def test_the_user_model_is_unchanged_by_shape_tracing():
    m, x = ShapeBranch().train(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trace(m, example_inputs=(x,))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_shape_tracing_leaves_batchnorm_statistics_of_the_traced_copy_alone():
    m, x = ShapeBranch().train(), torch.randn(2, 3, 8, 8) + 5
    gm = trace(m, example_inputs=(x,))
    assert torch.equal(gm.get_submodule("bn").running_mean, m.bn.running_mean)


def test_the_traced_graph_computes_the_model_on_the_example_shapes():
    m, x = ShapeBranch().eval(), torch.randn(2, 3, 8, 8)
    gm = trace(m, example_inputs=(x,))
    assert torch.allclose(gm(x), m(x), atol=1e-6)


def test_data_dependent_if_is_a_trace_error_naming_line_and_op():
    with pytest.raises(TraceError) as e:
        oba_fx.prune_graph(DataBranch(), (torch.randn(2, 4),), channel_ratio=0.3, verbose=False)
    msg = str(e.value)
    assert "if x.sum() > 0:" in msg and "gt (from sum)" in msg and "torch.where" in msg


def test_without_example_inputs_shape_control_flow_is_still_a_trace_error():
    with pytest.raises(TraceError, match=r"x.shape\[-1\] > 4"):
        trace(ShapeBranch())
