"""Running the rules over a graph: coupling, FLOPs counting and slimming."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx

from .. import meta as M
from ..spaces import EMPTY, Builder, TensorSpaces, AnalysisState
from .base import Ctx, FlopCtx, SlimCtx, shape_of, spaces_of, tensor_args, tuple_args, barrier, rule_for_node
from .sizes import check_taint, is_tensor, size_node


# ============================================================================ driver
def apply_rule(gm: torch.fx.GraphModule, node: torch.fx.Node, b: Builder, state: AnalysisState) -> None:
    """Run the coupling rule of one node (called by :func:`oba_fx.coupling.analyze`)."""
    ctx = Ctx(gm, node, b, state)
    if node.op == "placeholder":
        node.meta[M.SPACES] = EMPTY if is_tensor(node) else None
        return
    if node.op == "get_attr":
        sh = shape_of(node)
        if sh is None:
            node.meta[M.SPACES] = None
            return
        node.meta[M.SPACES] = TensorSpaces(tuple(
            b.param_space(node.target, d, n, primary=False) for d, n in enumerate(sh)))
        return
    if node.op == "output":
        b.pin_all([spaces_of(a) for a in tensor_args(node) + tuple_args(node)])
        check_taint(ctx)
        return
    if size_node(ctx):
        node.meta[M.SPACES] = None
        return
    rule = rule_for_node(gm, node, state.modules)
    if node.meta.get(M.TENSOR_META) is None and not tensor_args(node):
        check_taint(ctx)  # plain Python values (or None picked from a tuple)
        node.meta[M.SPACES] = None
        return
    if rule is None:
        what = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else _fn_name(node.target)
        barrier(node, b, f"no rule for {node.op} {what}")
        check_taint(ctx)
        return
    if node.meta.get(M.TENSOR_META) is None:
        barrier(node, b, f"{rule.name}: no shape information (did shape propagation run?)")
        return
    try:
        rule.couple(ctx)
    except Exception as e:  # a rule that cannot understand this use of its op: never guess
        barrier(node, b, f"{rule.name}: unsupported use ({type(e).__name__}: {e})")
    check_taint(ctx)


def _fn_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def count_flops(gm: torch.fx.GraphModule, shape_fn: Callable[[Any], tuple] | None = None) -> int:
    """FLOPs of a shape-propagated graph (fvcore convention), optionally with other shapes."""
    shape_fn = shape_fn or shape_of
    total = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = rule_for_node(gm, node)
        if rule is None or rule.flops is None or shape_of(node) is None:
            continue
        total += int(rule.flops(FlopCtx(gm, node, shape_fn)))
    return total


def slim_node(gm: torch.fx.GraphModule, node: torch.fx.Node, coupling, removed: np.ndarray) -> None:
    """Apply the slim rule of ``node`` (module replacement or constant rewrite)."""
    rule = rule_for_node(gm, node)
    if rule is not None and rule.slim is not None:
        rule.slim(SlimCtx(gm, node, coupling, removed))
