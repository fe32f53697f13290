"""LeafTracer's cheaper hooks (oba_fx/leaf_tracer.py) record the graph torch.fx records: same
nodes, names, targets, arguments, types and ``nn_module_stack``, same scopes, same errors."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oba_fx.leaf_tracer import LeafTracer, append_node, is_tensor_method_or_property

Pair = namedtuple("Pair", "a b")


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale


class Busy(nn.Module):
    """Every kind of argument and call the hooks see: a module called twice, a parameter and a
    buffer read directly, a plain tensor attribute (a constant), a namedtuple, keyword
    arguments, slices, dtypes, ``math`` on a size, nested containers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.inner = Inner()
        self.register_buffer("shift", torch.zeros(4, 1, 1))
        self.const = torch.full((1, 4, 1, 1), 0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.stem(x)
        y = self.inner(self.inner(y)) + self.shift + self.const
        p = Pair(y, y[:, 1:3])
        z = torch.cat([p.a[:, :2], p.b], dim=1).to(dtype=torch.float32)
        z = F.interpolate(z, scale_factor=math.sqrt(4), mode="nearest")
        return self.head(z.mean((2, 3))), {"aux": [z.sum(), (z.max(),)]}


def signature(graph: torch.fx.Graph) -> list:
    return [(n.name, n.op, n.target, repr(n.args), repr(n.kwargs), n.type, sorted(n.meta),
             repr(n.meta.get("nn_module_stack"))) for n in graph.nodes]


def test_graph_and_scopes_equal_torch_fx_on_every_kind_of_argument():
    ours, theirs = LeafTracer(), torch.fx.Tracer()
    g1, g2 = ours.trace(Busy()), theirs.trace(Busy())
    assert signature(g1) == signature(g2)
    assert ours.node_name_to_scope == theirs.node_name_to_scope
    assert ours.num_calls == theirs.num_calls and ours.num_calls["inner"] == 2
    assert sorted(ours.tensor_attrs.values()) == sorted(theirs.tensor_attrs.values())


def test_the_traced_graph_computes_what_the_model_computes():
    torch.manual_seed(0)
    m, x = Busy().eval(), torch.randn(2, 3, 6, 6)
    gm = torch.fx.GraphModule(m, LeafTracer().trace(m))
    (a, aux), (b, aux2) = gm(x), m(x)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(aux["aux"][0], aux2["aux"][0], atol=1e-4)


def test_user_leaf_modules_stay_single_calls():
    g = LeafTracer([Inner]).trace(Busy())
    assert [n.target for n in g.nodes if n.op == "call_module"].count("inner") == 2
    g = LeafTracer(["inner"]).trace(Busy())
    assert "inner" in [n.target for n in g.nodes if n.op == "call_module"]


class Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(Bad())

    def forward(self, x):
        return self.block(x)


class Bad(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a Proxy
            return x
        return -x


def test_a_failing_call_leaves_its_module_on_the_stack_and_restores_the_scope():
    ours, theirs = LeafTracer(), torch.fx.Tracer()
    for t in (ours, theirs):
        with pytest.raises(torch.fx.proxy.TraceError):
            t.trace(Fails())
    assert list(ours.module_stack) == list(theirs.module_stack) == ["block", "block.0"]
    assert (ours.scope.module_path, ours.scope.module_type) == ("", None)


def test_append_node_equals_graph_create_node():
    g1, g2 = torch.fx.Graph(), torch.fx.Graph()
    for g, make in ((g1, append_node), (g2, torch.fx.Graph.create_node)):
        x = g.placeholder("x")
        y = make(g, "call_module", "layer1.0.conv", (x,), {})
        z = make(g, "call_method", "__add__", (y, 1), {})
        make(g, "call_function", F.relu, (z,), {"inplace": False})
        make(g, "call_module", "layer1.0.conv", (x,), {})
        g.output(z)
    assert signature(g1) == signature(g2)
    assert [[u.name for u in n.users] for n in g1.nodes] == [[u.name for u in n.users] for n in g2.nodes]
    assert len(g1.nodes) == len(g2.nodes) == 6
    assert g1.find_nodes(op="call_module", target="layer1.0.conv")[1].name == "layer1_0_conv_1"


class TensorMethodsOnProxies(nn.Module):
    """Calls that reach ``Proxy.__torch_function__``: methods of a real tensor given a Proxy, a
    torch function, a ``torch.nn.functional`` function."""

    def __init__(self) -> None:
        super().__init__()
        self.const = torch.full((1, 3, 1, 1), 0.5)

    def forward(self, x):
        y = self.const.add(x)
        y = torch.Tensor.mul(self.const, y) + F.relu(y)
        return torch.flatten(y, 1)


def test_tensor_methods_and_functions_on_proxies_give_torch_fx_graph():
    ours, theirs = LeafTracer(), torch.fx.Tracer()
    g1, g2 = ours.trace(TensorMethodsOnProxies()), theirs.trace(TensorMethodsOnProxies())
    assert signature(g1) == signature(g2)
    assert [n.op for n in g1.nodes if n.target in ("add", "mul")] == ["call_method", "call_method"]


def test_tensor_method_check_agrees_with_torch_on_every_overridable_function():
    from torch.overrides import get_overridable_functions, is_tensor_method_or_property as theirs

    funcs = [f for fs in get_overridable_functions().values() for f in fs]
    assert len(funcs) > 500
    assert [f for f in funcs if is_tensor_method_or_property(f) != theirs(f)] == []


def test_tracing_does_not_build_torchs_table_of_overridable_functions():
    import subprocess
    import sys
    code = ("import torch, torch.overrides as o\n"
            "from oba_fx.leaf_tracer import LeafTracer\n"
            "class M(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        return torch.flatten(x, 1).mean(1)\n"
            "LeafTracer().trace(M())\n"
            "print(o._get_tensor_methods.cache_info().currsize)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


class SharedTensors(nn.Module):
    """A parameter shared by two submodules (two names), read directly in both; a buffer read
    directly; a parameter of the root itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.register_buffer("offset", torch.ones(3))
        self.gain = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        y = F.linear(x, self.b.weight) + F.linear(x, self.a.weight, self.a.bias)
        return y * self.gain + self.offset + self.b.bias


@pytest.mark.parametrize("settings", [{}, {"param_shapes_constant": True}, {"proxy_buffer_attributes": False}])
def test_parameter_and_buffer_reads_give_torch_fx_graph(settings):
    ours, theirs = LeafTracer(), torch.fx.Tracer()
    for k, v in settings.items():
        setattr(ours, k, v)
        setattr(theirs, k, v)
    g1, g2 = ours.trace(SharedTensors()), theirs.trace(SharedTensors())
    assert signature(g1) == signature(g2)
    assert [n.target for n in g1.nodes if n.op == "get_attr"] == [n.target for n in g2.nodes if n.op == "get_attr"]
