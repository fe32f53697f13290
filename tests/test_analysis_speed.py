"""The faster analysis (issue 12 item 5) gives the same results: shapes on the ``meta`` device
equal the fake-tensor shapes, its fallbacks work, the Hessian structure is computed only when
asked and the set-based block collection gives the same graph as a pair-by-pair one."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oba_fx import meta as M
from oba_fx.errors import BadInputError
from oba_fx.hessian_blocks import block_structure
from oba_fx.passes.pipeline import analyze_model
from oba_fx.passes.shape_prop import ShapePropPass
from oba_fx.tracing import _meta_shapes, eval_mode, propagate_shapes, trace


class Mixed(nn.Module):
    """Conv + BN + activations, LayerNorm over channels-last, attention, a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish()
        self.ln, self.qkv, self.out = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 5)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (N, HW, 8)
        q, k, v = self.qkv(self.ln(y)).chunk(3, dim=-1)
        y = y + F.gelu(F.scaled_dot_product_attention(q, k, v))
        return self.out(y.mean(1))


def _shapes(gm):
    def one(tm):
        if hasattr(tm, "shape"):
            return tuple(tm.shape), tm.dtype
        return [one(t) for t in tm] if isinstance(tm, (tuple, list)) else tm
    return [(n.name, one(n.meta["tensor_meta"])) for n in gm.graph.nodes if n.op != "output"]


def _fake_shapes(model, x):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    gm = trace(model)
    with eval_mode(gm):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(x))
    return _shapes(gm)


def test_meta_shapes_equal_fake_tensor_shapes():
    model, x = Mixed().eval(), torch.randn(2, 3, 4, 4)
    gm = trace(model)
    with eval_mode(gm):
        _meta_shapes(gm, (x,))  # raises if the meta path does not run through
    assert _shapes(gm) == _fake_shapes(model, x)


def test_parameters_and_buffers_are_back_after_shape_propagation():
    gm = trace(Mixed())
    before = {k: v for k, v in itertools.chain(gm.named_parameters(), gm.named_buffers())}
    propagate_shapes(gm, (torch.randn(2, 3, 4, 4),))
    after = dict(itertools.chain(gm.named_parameters(), gm.named_buffers()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


class NonZero(nn.Module):
    """Data-dependent output size: neither meta nor fake tensors can run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.nonzero(self.fc(x) > -1e9)


def test_meta_failure_falls_back_to_the_real_inputs():
    gm = trace(NonZero())
    with pytest.raises(NotImplementedError), eval_mode(gm):
        _meta_shapes(gm, (torch.randn(2, 4),))
    propagate_shapes(gm, (torch.randn(2, 4),))
    assert _shapes(gm)[-1][1] == ((6, 2), torch.int64) and next(gm.parameters()).device.type == "cpu"


def test_batchnorm_shortcut_keeps_torchs_channel_check():
    gm = trace(nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(5)))
    with pytest.raises(BadInputError, match="node '_1'.*running_mean should contain 6 elements not 5"):
        ShapePropPass((torch.randn(1, 3, 4, 4),))(gm)


def test_analyze_model_computes_the_hessian_structure_only_when_asked():
    m, x = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), torch.randn(1, 2)
    assert M.HESSIAN_STRUCTURE not in analyze_model(m, (x,)).meta
    G = analyze_model(m, (x,), hessian_structure=True).meta[M.HESSIAN_STRUCTURE]
    assert sorted(G.edges(data="kind")) == [("0", "0", "parallel"), ("0", "2", "series")]


class DeepGelu(nn.Module):
    """A chain of Linear + GELU: every GELU mixes every pair of the layers upstream."""

    def __init__(self, n: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))

    def forward(self, x):
        for lin in self.layers:
            x = F.gelu(lin(x))
        return x


def test_deep_smooth_chain_has_every_pair_once_with_series_kind_where_upstream():
    n = 12
    G = block_structure(torch.fx.symbolic_trace(DeepGelu(n)))
    names = [f"layers.{i}" for i in range(n)]
    assert list(G.nodes) == names
    want = {(a, b) for a, b in itertools.combinations_with_replacement(names, 2)}
    assert {frozenset(e) for e in G.edges} == {frozenset(e) for e in want} and G.number_of_edges() == len(want)
    for i, j in itertools.combinations(range(n), 2):  # layer j reads what layer i wrote: series and parallel
        assert G.edges[names[i], names[j]]["kinds"] == ["parallel", "series"]
        assert G.edges[names[i], names[j]]["kind"] == "series"
    assert all(G.edges[a, a]["kind"] == "parallel" for a in names) and isinstance(G, nx.Graph)


def test_share_weights_holds_the_models_tensors_and_leaves_the_model_alone():
    model = Mixed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    shared, copied = (analyze_model(model, (x,), share_weights=s) for s in (True, False))
    assert shared.get_parameter("conv.weight") is model.conv.weight
    assert copied.get_parameter("conv.weight") is not model.conv.weight
    assert shared.get_submodule("conv") is not model.conv  # the modules are copies either way
    assert shared.meta[M.COUPLING].n_groups == copied.meta[M.COUPLING].n_groups
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class CountsTrain(nn.Linear):
    """A module with its own ``train()``: ``eval_mode`` must still call it."""

    calls = 0

    def train(self, mode: bool = True):
        CountsTrain.calls += 1
        return super().train(mode)


def test_eval_mode_puts_every_module_in_eval_and_restores_each_mode():
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2)))
    m.eval()
    m[1][1].train()
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert [x.training for x in m.modules()] == [False, False, False, False, True]


def test_eval_mode_calls_a_modules_own_train_even_when_all_are_in_eval():
    m = nn.Sequential(CountsTrain(2, 2)).eval()
    before = CountsTrain.calls
    with eval_mode(m):
        pass
    assert CountsTrain.calls == before + 1


class OwnEval(nn.Sequential):
    """A model with its own ``eval()``: ``eval_mode`` must call it, not only set the flags."""

    def eval(self):
        self.evaluated = True
        return super().eval()


def test_eval_mode_calls_the_models_own_eval():
    m = OwnEval(nn.Linear(2, 2), nn.Dropout())
    with eval_mode(m):
        assert getattr(m, "evaluated", False) and not m[1].training
    assert m.training and m[1].training


class Nested(nn.Module):
    """A module called twice, nested containers and a method call: scopes and module stacks."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1)))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.block(x)
        y = self.block[1](y).mean((2, 3))
        return self.head(y)


def test_leaf_tracer_records_the_scopes_and_module_stacks_of_torch_fx():
    from oba_fx.tracing import LeafTracer

    ours, theirs = LeafTracer(), torch.fx.Tracer()
    g1, g2 = ours.trace(Nested()), theirs.trace(Nested())
    assert str(g1) == str(g2)
    assert [n.meta.get("nn_module_stack") for n in g1.nodes] == [n.meta.get("nn_module_stack") for n in g2.nodes]
    assert all(type(n.meta["nn_module_stack"]) is type(m.meta["nn_module_stack"])
               for n, m in zip(g1.nodes, g2.nodes) if "nn_module_stack" in m.meta)
    assert ours.node_name_to_scope == theirs.node_name_to_scope and ours.scope.module_path == ""


class MyConv(nn.Conv2d):
    """A subclass: no shortcut, it runs on meta with its weights swapped in."""


class Functional(nn.Module):
    """Weights read by ``get_attr`` (a functional conv) and a layer that has to run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = MyConv(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(5, 4, 1, 1))
        self.register_buffer("scale", torch.ones(1, 5, 1, 1))

    def forward(self, x):
        return F.conv2d(self.conv(x), self.w) * self.scale


def test_meta_shapes_swap_in_what_runs_and_put_everything_back():
    model, x = Functional().eval(), torch.randn(2, 3, 6, 6)
    gm = trace(model)
    before = dict(itertools.chain(gm.named_parameters(), gm.named_buffers()))
    with eval_mode(gm):
        _meta_shapes(gm, (x,))  # raises if a tensor the graph reads was left on the CPU
    after = dict(itertools.chain(gm.named_parameters(), gm.named_buffers()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert _shapes(gm) == _fake_shapes(model, x)
