"""Size values: channel counts read with ``x.shape`` and where they may flow."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from ..spaces import AnalysisState
from .base import Ctx, shape_of, tensor_spaces
from .generic import size_args


# ============================================================================ size values
SIZE_FUNCTIONS = {getattr}
SIZE_METHODS = {"size", "dim", "numel", "ndimension"}
INT_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
             operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}
SIZE_CONSUMERS = {"view", "reshape", "expand", torch.reshape}


def is_tensor(node: Any) -> bool:
    return shape_of(node) is not None


def is_size_value(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a size (``x.shape``, ``x.size(1)``, ``x.dim()``, an item of
    those): an integer, with no derivative and no channels."""
    if node.op == "call_function" and node.target in SIZE_FUNCTIONS:  # x.shape (not r.values of a max)
        return shape_of(node) is None
    if node.op == "call_method" and node.target in SIZE_METHODS:
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        return is_size_value(node.args[0])
    return False


def size_node(ctx: Ctx) -> bool:
    """Handle x.shape / x.size() / x.size(d): record which channel spaces the value reveals."""
    node, st = ctx.node, ctx.state
    if node.op == "call_function" and node.target is getattr and is_tensor(node.args[0]):
        if node.args[1] == "shape":
            st.size_vec[node.name] = tuple(
                frozenset([s.id]) if (s := tensor_spaces(node.args[0]).at(d)) else frozenset()
                for d in range(len(shape_of(node.args[0]))))
        return True
    if node.op == "call_method" and node.target in SIZE_METHODS and is_tensor(node.args[0]):
        x = node.args[0]
        if node.target == "size":
            dim = ctx.arg(1, "dim")
            if dim is None:
                st.size_vec[node.name] = tuple(
                    frozenset([s.id]) if (s := tensor_spaces(x).at(d)) else frozenset() for d in range(len(shape_of(x))))
            else:
                s = tensor_spaces(x).at(dim % len(shape_of(x)))
                st.taint[node.name] = frozenset([s.id]) if s else frozenset()
        elif node.target == "numel":
            st.taint[node.name] = frozenset(s.id for s in tensor_spaces(x).spaces)
        return True
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is not None \
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in st.size_vec:
        vec, i = st.size_vec[node.args[0].name], node.args[1]
        if isinstance(i, int):
            st.taint[node.name] = vec[i]
        elif isinstance(i, slice):
            st.size_vec[node.name] = vec[i]
        return True
    if node.op == "call_function" and node.target in INT_ARITH and not is_tensor(node):
        st.taint[node.name] = frozenset().union(*(_taint_of(st, a) for a in node.args))
        return True
    return False


def _taint_of(st: AnalysisState, a: Any) -> frozenset[int]:
    if isinstance(a, torch.fx.Node):
        if a.name in st.size_vec:
            return frozenset().union(*st.size_vec[a.name]) if st.size_vec[a.name] else frozenset()
        return st.taint.get(a.name, frozenset())
    if isinstance(a, (tuple, list)):
        return frozenset().union(*(_taint_of(st, x) for x in a)) if a else frozenset()
    if isinstance(a, dict):
        return _taint_of(st, list(a.values()))
    return frozenset()


def check_taint(ctx: Ctx) -> None:
    """A channel count read from a shape may only size the spaced dims of view/reshape/expand
    (which slimming rewrites). Anywhere else it would silently keep the old count: pin."""
    node, st = ctx.node, ctx.state
    if not st.taint and not st.size_vec:  # no size read so far: nothing can be tainted
        return
    t = node.target
    if t in SIZE_CONSUMERS and is_tensor(node):
        start = 1
        sizes, _ = size_args(node, start)
        spaced = set(tensor_spaces(node).dims)
        bad = frozenset()
        for d, a in enumerate(sizes):
            if d not in spaced:
                bad |= _taint_of(st, a)
        bad |= _taint_of(st, node.args[:start])
    else:
        bad = _taint_of(st, node.args) | _taint_of(st, node.kwargs)
    for sid in bad:
        ctx.b.pin(ctx.b.spaces[sid])
    if bad:
        ctx.b.barrier(node, "a channel count read from a shape is used where slimming cannot rewrite it "
                            f"(an argument of {getattr(t, '__name__', t)}): those channels are pinned")


