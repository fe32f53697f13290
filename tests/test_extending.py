"""Extending oba_fx from user code: a criterion of one's own (the registry) and an op rule for
one's own layer (``oba_fx.ops.register``), without editing the package."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.criteria import UnknownCriterionError, criterion_names, get_criterion, register_criterion, \
    unregister_criterion
from oba_fx.ops import MODULE_RULES, Curvature, OpRule, numel, register, slice_attr
from oba_fx.spaces import TensorSpaces


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


@pytest.fixture
def by_index():
    """A data-free criterion scoring output channel i of the first conv as i (others as 1)."""
    @register_criterion("by_index", needs_data=False, description="channel index (test)")
    def fn(ctx):
        out = {n: torch.ones_like(t) for n, t in ctx.params.items()}
        out["0.weight"] = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 3, 3) + 1.0
        return out
    yield "by_index"
    unregister_criterion("by_index")


def test_a_registered_criterion_decides_which_channels_go(by_index):
    out = oba_fx.prune_graph(_net(), torch.randn(1, 3, 8, 8), criterion=by_index, channel_ratio=0.5, verbose=False)
    assert out.meta["oba"]["kept"]["0.weight"][0] == [4, 5, 6, 7]
    assert out.meta["oba"]["criterion"] == "by_index"


def test_a_registered_data_criterion_sees_every_calibration_batch():
    seen = []

    @register_criterion("grad_magnitude", needs_data=True)
    def fn(ctx, x, y):
        seen.append(x.shape[0])
        return {n: (ctx.params[n] * g).abs() for n, g in ctx.gradient(x, y).items()}

    try:
        data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)).view(4)) for _ in range(3)]
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 4)).eval()
        out = oba_fx.prune_graph(net, torch.randn(1, 3, 8, 8), criterion="grad_magnitude", data=data,
                                 max_batches=2, channel_ratio=0.5, verbose=False, bn_recalibration=False)
        assert seen == [4, 4]
        assert out.get_submodule("0").out_channels == 4
    finally:
        unregister_criterion("grad_magnitude")


def test_registry_errors_name_the_valid_criteria():
    with pytest.raises(UnknownCriterionError) as e:
        get_criterion("hessian_trace")
    assert all(n in str(e.value) for n in criterion_names()) and isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1", lambda ctx: {}, needs_data=False)
    with pytest.raises(ValueError, match="identifier"):
        register_criterion("not a name", lambda ctx: {}, needs_data=False)


def test_a_data_criterion_without_data_is_refused_before_any_work():
    with pytest.raises(ValueError, match="needs calibration data.*l1, l2, random"):
        oba_fx.prune_graph(_net(), torch.randn(1, 3, 8, 8), criterion="taylor", channel_ratio=0.5)


# ------------------------------------------------------------------------------------ op rules
class ChannelScale(nn.Module):
    """A user's layer: a learnable per-channel scale (traced as a leaf)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


def _couple_scale(ctx) -> None:
    sp = ctx.dim_map(ctx.node.args[0], {d: d for d in range(len(ctx.out_shape))})
    if 1 not in sp:
        sp[1] = ctx.new(1)
        ctx.b.pin(sp[1])
    ctx.b.union(sp[1], ctx.param("scale", 0))
    ctx.set(TensorSpaces(tuple(sp.values())))


def _slim_scale(ctx) -> None:
    slice_attr(ctx.module, "scale", 0, ctx.param_kept("scale", 0))


def _scaled_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelScale(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def test_a_user_layer_without_a_rule_is_a_reported_barrier():
    x = torch.randn(2, 3, 8, 8)
    out = oba_fx.prune_graph(_scaled_net(), x, channel_ratio=0.5, leaf_modules=[ChannelScale], verbose=False)
    assert any("ChannelScale" in b["reason"] for b in out.meta["oba"]["barriers"])
    assert out.meta["oba"]["units_prunable"] == 0 and out.get_submodule("0").out_channels == 8


def test_a_registered_rule_prunes_through_a_user_layer_and_verifies():
    register(OpRule("channel_scale", _couple_scale, _slim_scale, lambda c: numel(c.out), Curvature.LAYER),
             modules=[ChannelScale])
    try:
        model, x = _scaled_net(), torch.randn(2, 3, 8, 8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = oba_fx.prune_graph(model, x, channel_ratio=0.5, leaf_modules=[ChannelScale], verbose=False)
        kept = out.meta["oba"]["kept"]["1.scale"][0]
        assert out.get_submodule("1").scale.shape == (4,) and out.get_submodule("0").out_channels == 4
        assert out.meta["oba"]["barriers"] == [] and out.meta["oba"]["max_rel_error"] < 1e-5
        # independent check: the original with the removed channels zeroed after the scale
        mask = torch.zeros(1, 8, 1, 1)
        mask[0, kept] = 1
        with torch.no_grad():
            ref = model[3](model[2](model[1](model[0](x)) * mask))
            assert torch.allclose(out(x), ref, atol=1e-5 * float(ref.abs().max()))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        with pytest.raises(ValueError, match="already has the op rule 'channel_scale'"):
            register(OpRule("other", _couple_scale), modules=[ChannelScale])
    finally:
        MODULE_RULES.pop(ChannelScale, None)


def test_an_unknown_curvature_in_a_rule_is_refused():
    with pytest.raises(ValueError, match="unknown curvature 'wiggly'"):
        OpRule("bad", _couple_scale, curvature="wiggly")


def test_the_command_line_refuses_an_unknown_criterion_fast_listing_the_valid_ones():
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "oba_fx.cli", "prune", "--criterion", "foo"], capture_output=True,
                       text=True)
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0 and "unknown criterion 'foo'" in r.stderr and "Traceback" not in r.stderr
    assert all(n in r.stderr for n in criterion_names())
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, oba_fx.cli; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True).stdout.split()
    assert elapsed < 10  # generous on a loaded machine; the import check above is the real guard
