"""Simplification of the generated fused-HVP program (aten level).

Valid for the functionalised ``make_fx`` trace of the fused function that
:func:`oba_fx.hvp_program.build_hvp_program` produces, where the tangent *is* ``θ``: aliases
and detaches are dropped, exact zeros are propagated (the input's zero tangent), a convolution
backward is split into the halves that are used, and common-subexpression elimination finds that
the tangent ``conv(X, θ)`` is the primal ``conv(X, W)``. The op sets here are aten overloads
(what ``make_fx`` emits), not the torch-level ops of the op table :mod:`oba_fx.ops`.

See :func:`simplify_hvp_graph` for an example.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx


aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.add(getattr(op, overload or "default"))
    return frozenset(out)


_IDENTITY = _ops("alias.default", "detach.default", "alias_copy.default", "detach_copy.default",
                 "lift_fresh_copy.default")
_ZERO_MAKERS = _ops("zeros.default", "zeros_like.default", "new_zeros.default", "_efficientzerotensor.default")
_FILLS = _ops("full.default", "full_like.default", "new_full.default", "fill.Scalar")
#: ops whose result is zero when their first argument is
_ZERO_IF_FIRST = _ops("view.default", "_unsafe_view.default", "reshape.default", "expand.default", "t.default",
                      "transpose.int", "permute.default", "unsqueeze.default", "squeeze.default", "squeeze.dim",
                      "squeeze.dims", "clone.default", "slice.Tensor", "select.int", "_to_copy.default",
                      "contiguous.default", "neg.default", "sum.default", "sum.dim_IntList", "mean.default",
                      "mean.dim", "div.Tensor", "div.Scalar", "mul.Scalar", "threshold_backward.default",
                      "repeat.default", "unfold.default", "expand_copy.default", "view_copy.default",
                      "t_copy.default", "permute_copy.default", "transpose_copy.int", "unsqueeze_copy.default",
                      "squeeze_copy.dim", "squeeze_copy.dims", "_unsafe_view.default", "select_copy.int",
                      "slice_copy.Tensor", "avg_pool2d.default",
                      "avg_pool2d_backward.default", "_adaptive_avg_pool2d.default",
                      "_adaptive_avg_pool2d_backward.default", "max_pool2d_with_indices_backward.default",
                      "gelu_backward.default", "tanh_backward.default", "sigmoid_backward.default")
#: ops whose result is zero when any of their first two (tensor) arguments is
_ZERO_IF_ANY2 = _ops("mul.Tensor", "mm.default", "bmm.default", "matmul.default")
_ADD, _SUB = _ops("add.Tensor"), _ops("sub.Tensor")
_ADDMM = _ops("addmm.default")
_CONV = _ops("convolution.default")
_CONV_BWD = _ops("convolution_backward.default")


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _same_shape(a: Any, b: Any) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


_SAME_SHAPE_VIEWS = _ops("expand.default", "view.default", "_unsafe_view.default", "reshape.default")
_TO_COPY = _ops("_to_copy.default")


def _is_identity(node: torch.fx.Node) -> bool:
    """An alias, a same-shape view / expand, or a ``_to_copy`` that changes nothing."""
    t = node.target
    if not isinstance(node.args[0] if node.args else None, torch.fx.Node) or not _same_shape(node, node.args[0]):
        return False
    if t in _IDENTITY or t in _SAME_SHAPE_VIEWS:
        return True
    if t in _TO_COPY:
        src = _val(node.args[0])
        kw = dict(node.kwargs)
        return (set(kw) <= {"dtype", "layout", "device", "non_blocking"} and kw.get("dtype", src.dtype) == src.dtype
                and kw.get("layout", torch.strided) == src.layout
                and torch.device(kw.get("device", src.device)) == src.device)
    return False


def _drop_identities(graph: torch.fx.Graph) -> int:
    n_done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            n_done += 1
    return n_done


def _split_conv_backward(graph: torch.fx.Graph) -> int:
    """One ``convolution_backward`` per used output, with the unused ``bias_sizes`` normalised."""
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CONV_BWD:
            continue
        mask = list(node.args[10])
        users = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
        if len(users) != len(node.users):
            continue
        used = sorted({u.args[1] for u in users})
        if len(used) == 1 and mask == [i == used[0] for i in range(3)] and (used[0] == 2 or node.args[3] is None):
            continue
        for i in used:
            args = list(node.args)
            args[10] = [j == i for j in range(3)]
            if i != 2:
                args[3] = None
            with graph.inserting_before(node):
                new = graph.call_function(aten.convolution_backward.default, tuple(args))
                new.meta = dict(node.meta)
                item = graph.call_function(operator.getitem, (new, i))
                item.meta["val"] = node.meta["val"][i] if isinstance(node.meta.get("val"), (tuple, list)) else None
            for u in [u for u in users if u.args[1] == i]:
                u.replace_all_uses_with(item)
                graph.erase_node(u)
        graph.erase_node(node)
        n_done += 1
    return n_done


def _is_zero_const(node: Any, zero: set) -> bool:
    return isinstance(node, torch.fx.Node) and node in zero


def _propagate_zeros(graph: torch.fx.Graph) -> int:
    """Mark tensors that are exactly zero and fold them away (``a + 0 → a``, ``0 · b → 0``...)."""
    zero: set = set()
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        z = False
        if t in _ZERO_MAKERS:
            z = True
        elif t in _FILLS:
            val = a[-1] if t is not aten.full.default else a[1]
            z = isinstance(val, (int, float)) and val == 0
        elif t in _ZERO_IF_FIRST:
            z = _is_zero_const(a[0], zero)
        elif t in _ZERO_IF_ANY2:
            z = _is_zero_const(a[0], zero) or _is_zero_const(a[1], zero)
        elif t in _CONV:
            z = (_is_zero_const(a[0], zero) or _is_zero_const(a[1], zero)) and (a[2] is None or a[2] in zero)
        elif t in _CONV_BWD:
            mask = list(a[10])
            if sum(mask) == 1:
                i = mask.index(True)
                z = _is_zero_const(a[0], zero) or (i == 0 and a[2] in zero) or (i == 1 and a[1] in zero)
        elif t is operator.getitem and isinstance(a[0], torch.fx.Node) and a[0] in zero:
            z = True
        elif t in _ADD or t in _SUB:
            lhs, rhs = a[0], a[1]
            alpha = node.kwargs.get("alpha", 1)
            if _is_zero_const(lhs, zero) and _is_zero_const(rhs, zero):
                z = True
            elif _is_zero_const(rhs, zero) and _same_shape(node, lhs):
                node.replace_all_uses_with(lhs)
                graph.erase_node(node)
                n_done += 1
                continue
            elif t in _ADD and alpha == 1 and _is_zero_const(lhs, zero) and _same_shape(node, rhs):
                node.replace_all_uses_with(rhs)
                graph.erase_node(node)
                n_done += 1
                continue
        elif t in _ADDMM and len(a) == 3 and not node.kwargs:
            if _is_zero_const(a[1], zero) or _is_zero_const(a[2], zero):
                z = a[0] in zero
        if not z:
            continue
        zero.add(node)
        if t in _ZERO_MAKERS or t in _FILLS or t is operator.getitem:
            continue
        val = _val(node)
        if not isinstance(val, torch.Tensor):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(aten.zeros.default, (list(val.shape),),
                                      {"dtype": val.dtype, "device": val.device})
            new.meta["val"] = val
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        zero.add(new)
        n_done += 1
    return n_done


def _addmm_to_mm(graph: torch.fx.Graph) -> int:
    """``addmm(b, A, B) → mm(A, B) + b``, so that a tangent ``mm(X, θᵀ)`` can reuse the primal."""
    n_done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ADDMM and len(node.args) == 3 and not node.kwargs:
            b, m1, m2 = node.args
            with graph.inserting_before(node):
                mm = graph.call_function(aten.mm.default, (m1, m2))
                out = graph.call_function(aten.add.Tensor, (mm, b))
            val = _val(node)
            mm.meta["val"] = val
            out.meta["val"] = val
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            n_done += 1
    return n_done


def _freeze(arg: Any) -> Any:
    if isinstance(arg, (list, tuple)):
        return tuple(_freeze(a) for a in arg)
    if isinstance(arg, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in arg.items()))
    if isinstance(arg, float) and math.isnan(arg):
        return ("nan",)
    return arg


def _cse_key(node: torch.fx.Node) -> Any:
    t = node.target
    if t in _CONV_BWD and list(node.args[10]) == [True, False, False]:
        # the input-gradient depends on the input only through its shape, dtype and layout
        v = _val(node.args[1])
        if isinstance(v, torch.Tensor):
            args = list(node.args)
            args[1] = ("like", tuple(v.shape), tuple(v.stride()), v.dtype)
            return (t, _freeze(args), _freeze(node.kwargs))
    return (t, _freeze(node.args), _freeze(node.kwargs))


def _cse(graph: torch.fx.Graph) -> int:
    seen: dict = {}
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
                continue
        elif t is not operator.getitem:
            continue
        try:
            key = _cse_key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            n_done += 1
        else:
            seen[key] = node
    return n_done


def simplify_hvp_graph(gm: torch.fx.GraphModule, max_rounds: int = 4) -> dict[str, int]:
    """Simplify a functionalised ``make_fx`` trace of the fused function in place.

    Rewrites (each exact for a functionalised, mutation-free trace): drop aliases, detaches,
    same-shape views and no-op ``_to_copy``;
    ``addmm → mm + add``; split ``convolution_backward`` per used output; propagate exact zeros;
    common-subexpression elimination (deterministic, non-mutating ops; input-gradients of a
    convolution keyed by the input's shape instead of its value); dead-code elimination.
    Rounds repeat until nothing changes.

    Returns:
        counts of each rewrite.

    Example:
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> def f(a, b):
        ...     return torch.mm(a, b.detach()) + torch.mm(a, b) + torch.zeros_like(a) @ b
        >>> gm = make_fx(f)(torch.randn(2, 2), torch.randn(2, 2))
        >>> stats = simplify_hvp_graph(gm)
        >>> sum(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes)
        1
    """
    g = gm.graph
    counts = {"identities": 0, "addmm": 0, "conv_backward_split": 0, "zeros": 0, "cse": 0}
    counts["addmm"] += _addmm_to_mm(g)
    counts["conv_backward_split"] += _split_conv_backward(g)
    for _ in range(max_rounds):
        changed = 0
        for key, rewrite in (("identities", _drop_identities), ("zeros", _propagate_zeros), ("cse", _cse)):
            k = rewrite(g)
            counts[key] += k
            changed += k
        g.eliminate_dead_code()
        if not changed:
            break
    g.lint()
    gm.recompile()
    return counts
