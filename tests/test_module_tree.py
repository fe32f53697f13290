"""The analysis-only copies: ``module_tree_copy`` (new modules, shared values) and
``install_targets`` (what ``torch.fx.GraphModule(root, graph)`` copies, built faster)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torchvision

from oba_fx.leaf_tracer import LeafTracer
from oba_fx.module_copy import module_tree_copy
from oba_fx.tracing import graph_module


class Buffers(nn.Module):
    """A get_attr of a parameter and of a non-persistent buffer, a shared submodule, an odd copy."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.again = self.body[0]
        self.scale = nn.Parameter(torch.ones(4, 1, 1))
        self.register_buffer("shift", torch.zeros(4, 1, 1), persistent=False)
        self.sub = nn.Module()
        self.sub.register_buffer("offset", torch.ones(1))

    def forward(self, x):
        return self.again(x) * self.scale + self.body(x) + self.shift + self.sub.offset


def _layout(gm: nn.Module) -> tuple:
    """Names and identities of modules, parameters and buffers, persistence and modes."""
    return ([(n, type(m).__qualname__ if n else "root", m.training, sorted(m._non_persistent_buffers_set)) for n, m in gm.named_modules()],
            [(n, id(p)) for n, p in gm.named_parameters()], [(n, id(b)) for n, b in gm.named_buffers()],
            sorted(gm.state_dict()))


def test_fast_graph_module_holds_what_torch_copies():
    for model in (Buffers(), torchvision.models.mobilenet_v3_small(), torchvision.models.regnet_x_400mf()):
        tracer = LeafTracer(())
        graph = tracer.trace(model.eval())
        ours, theirs = graph_module(model, graph, "M", lazy=True), torch.fx.GraphModule(model, graph, "M")
        assert _layout(ours) == _layout(theirs)
        assert ours._tracer_cls is theirs._tracer_cls and ours.code == theirs.code


def test_fast_graph_module_runs_like_the_model():
    model = Buffers().eval()
    gm = graph_module(model, LeafTracer(()).trace(model), "M", lazy=True)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(gm(x), model(x))


def test_module_tree_copy_shares_values_not_tables():
    model = Buffers()
    copy = module_tree_copy(model)
    assert copy is not model and copy.body[0] is not model.body[0] and copy.again is copy.body[0]
    assert copy.body[0].weight is model.body[0].weight and copy.shift is model.shift
    copy.eval()
    copy.body[0].weight = nn.Parameter(torch.zeros(4, 3, 3, 3))  # a swap in the copy's own table
    assert model.training and model.body[0].weight.abs().sum() > 0
