"""Generic coupling rules shared by many ops: broadcasting, per-dim maps, reductions, reshape."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx

from ..spaces import EMPTY, Space, TensorSpaces
from .base import Ctx, SlimCtx, shape_of, tensor_args, tensor_spaces


# ============================================================================ generic rules
def tie_or_pin(ctx: Ctx, *spaces: Space | None) -> Space | None:
    """Tie the given spaces index by index; if one is missing (the dim cannot be sliced
    there) pin the others. Returns the first space when all are present."""
    present = [s for s in spaces if s is not None]
    if len(present) < len(spaces):
        for s in present:
            ctx.b.pin(s)
        return None
    for s in present[1:]:
        ctx.b.union(present[0], s)
    return present[0] if present else None


def mark_primary(ctx: Ctx, w: Any, dim: int) -> None:
    """A tensor read with ``get_attr`` as a functional layer's weight: its output-channel dim is
    that layer's own (scored) dim."""
    if isinstance(w, torch.fx.Node) and w.op == "get_attr" and shape_of(w) is not None:
        ctx.b.param_space(w.target, dim, shape_of(w)[dim], primary=True)


def couple_broadcast(ctx: Ctx, args: list[Any] | None = None) -> None:
    """Elementwise op over broadcast operands: out dim d is tied to every operand's dim d."""
    out = ctx.out_shape
    if out is None:
        return ctx.set(EMPTY)
    operands = _operands(tensor_args(ctx.node) if args is None else args)
    spaces = [o for d in range(len(out)) if (o := _broadcast_dim(ctx, operands, d)) is not None]
    ctx.set(TensorSpaces(tuple(spaces)))


def _operands(args: list[Any]) -> list[tuple[tuple[int, ...], TensorSpaces]]:
    """The shape and spaces of each operand, looked up once for all dims."""
    return [(shape_of(a), tensor_spaces(a)) for a in args]


def broadcast_dim(ctx: Ctx, args: list[Any], d: int) -> Space | None:
    """The output space of dim ``d`` of a broadcasting op over ``args`` (aligned from the
    right), tied to every operand's space there; ``None`` when there is none. An operand that
    broadcasts from size 1 has its space pinned; an operand without a space spanning the dim
    pins the others (it could not be sliced)."""
    return _broadcast_dim(ctx, _operands(args), d)


def _broadcast_dim(ctx: Ctx, operands: list[tuple[tuple[int, ...], TensorSpaces]], d: int) -> Space | None:
    out = ctx.out_shape
    nd = len(out)
    tied: list[Space] = []
    blocked = False
    for sh, spaces in operands:
        ad = d - (nd - len(sh))
        if ad < 0:
            continue
        s = spaces.at(ad)
        if sh[ad] != out[d]:  # broadcast from size 1
            ctx.b.pin(s)
        elif s is None:
            blocked = blocked or out[d] > 1
        else:
            tied.append(s)
    if not tied:
        return None
    if blocked:
        for s in tied:
            ctx.b.pin(s)
        return None
    o = ctx.new(d)
    for s in tied:
        ctx.b.union(s, o)
    return o


def couple_keep_dims(keep: Callable[[int], bool]) -> Callable[[Ctx], None]:
    """Ops that act within some dims (pooling, upsampling): spaces on kept dims pass."""

    def couple(ctx: Ctx) -> None:
        src = tensor_args(ctx.node)[0]
        nd = len(shape_of(src))
        m = {d: (d if keep(d) and d < len(ctx.out_shape) else None) for d in range(nd)}
        for d, od in list(m.items()):
            if od is not None and shape_of(src)[d] != ctx.out_shape[od]:
                m[d] = None
        ctx.set(TensorSpaces(tuple(ctx.dim_map(src, m).values())))

    return couple


couple_spatial = couple_keep_dims(lambda d: d < 2)


def norm_dims(d: Any, nd: int) -> tuple[int, ...] | None:
    if d is None:
        return None
    if isinstance(d, int):
        d = (d,)
    return tuple(sorted(x % nd for x in d))


def couple_reduce(ctx: Ctx) -> None:
    """mean/sum/amax/... over ``dim``: reduced dims are pinned, the others pass."""
    src = ctx.node.args[0]
    nd = len(shape_of(src))
    dims = norm_dims(ctx.arg(1, "dim"), nd)
    keep = bool(ctx.arg(2, "keepdim", False))
    if dims is None:
        dims = tuple(range(nd))
    m: dict[int, int | None] = {}
    j = 0
    for d in range(nd):
        if d in dims:
            m[d] = None
            j += keep
        else:
            m[d] = j
            j += 1
    ctx.set(TensorSpaces(tuple(ctx.dim_map(src, m).values())))


def couple_pin_dim(dim_arg: tuple[int, str], default: Any = None, from_module: str | None = None):
    """Ops that mix all indices of one dim (softmax): that dim is pinned, the others pass."""

    def couple(ctx: Ctx) -> None:
        src = tensor_args(ctx.node)[0]
        nd = len(shape_of(src))
        d = getattr(ctx.module, from_module) if from_module else ctx.arg(*dim_arg, default)
        if d is None:
            return ctx.barrier("dim=None mixes every dimension")
        d %= nd
        ctx.set(TensorSpaces(tuple(ctx.dim_map(src, {x: (None if x == d else x) for x in range(nd)}).values())))

    return couple


def couple_last_dims_mixed(k_of: Callable[[Ctx], int]) -> Callable[[Ctx], None]:
    """LayerNorm-like: statistics over the last k dims, so they are pinned."""

    def couple(ctx: Ctx) -> None:
        src = tensor_args(ctx.node)[0]
        nd = len(shape_of(src))
        k = k_of(ctx)
        ctx.set(TensorSpaces(tuple(ctx.dim_map(src, {d: (d if d < nd - k else None) for d in range(nd)}).values())))

    return couple


# ---- reshape ---------------------------------------------------------------------------
def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Partition the dims of two shapes of equal numel into matching contiguous groups.

    Example:
        >>> reshape_groups((2, 6, 4), (2, 3, 2, 4))
        [([0], [0]), ([1], [1, 2]), ([2], [3])]
    """
    if 0 in a or 0 in b or math.prod(a) != math.prod(b):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb, pa, pb = [i], [j], a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                ga.append(i)
                i += 1
            else:
                pb *= b[j]
                gb.append(j)
                j += 1
        groups.append((ga, gb))
    if not groups:
        groups.append(([], []))
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


def couple_reshape(ctx: Ctx, src: Any = None) -> None:
    """view/reshape/flatten: each space maps to the outermost output dim its index varies
    along; output indices that hold parts of one input index are tied to it (flatten ->
    features c*HW..c*HW+HW-1; split into heads -> a head is one unit).

    A split into several varying dims (``3*C -> (3, heads, head_dim)`` of a packed qkv) first
    takes the outermost; when all of that choice's units end up pinned (``qkv[0]`` indexes the
    ``3`` away), :func:`oba_fx.coupling.analyze` runs again with the next dim chosen
    (``state.split_choice``), so the heads become the units."""
    src = ctx.node.args[0] if src is None else src
    ish, osh = shape_of(src), ctx.out_shape
    groups = reshape_groups(ish, osh)
    ts = tensor_spaces(src)
    if groups is None:
        return ctx.barrier("reshape between shapes with zero-size dims")
    out: dict[int, Space] = {}
    for gi, go in groups:
        gshape = [ish[d] for d in gi]
        oshape = [osh[d] for d in go]
        for s in ts.spaces:
            if s.dim not in gi:
                continue
            pos = gi.index(s.dim)
            idx = np.arange(gshape[pos]).reshape([-1 if k == pos else 1 for k in range(len(gi))])
            val = np.broadcast_to(idx, gshape).reshape(oshape)
            vary = [k for k in range(len(go)) if val.shape[k] > 1 and not (val == val.take([0], axis=k)).all()]
            if not vary:
                ctx.b.pin(s)
                continue
            key = (ctx.node.name, s.dim)
            k = vary[min(ctx.state.split_choice.get(key, 0), len(vary) - 1)]
            od = go[k]
            o = out.get(od) or ctx.new(od)
            out[od] = o
            if len(vary) > 1:
                ctx.state.splits.append((key, len(vary), o))
            moved = np.moveaxis(val, k, 0).reshape(val.shape[k], -1)
            # out index j is tied to every input index in moved[j]
            cols = moved.shape[1]
            ctx.b.union(s, o, moved.ravel(), np.repeat(np.arange(o.size), cols))
    ctx.set(TensorSpaces(tuple(out.values())))


def size_args(node: torch.fx.Node, start: int) -> tuple[list[Any], bool]:
    rest = list(node.args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0]), True
    if not rest and "size" in node.kwargs:
        return list(node.kwargs["size"]), True
    if not rest and "shape" in node.kwargs:
        return list(node.kwargs["shape"]), True
    return rest, False


def slim_sizes(start: int, fill: Callable[["SlimCtx", int], Any]) -> Callable[["SlimCtx"], None]:
    """Rewrite the size arguments of view/reshape/expand for spaced output dims."""

    def slim(ctx: SlimCtx) -> None:
        node = ctx.node
        sizes, packed = size_args(node, start)
        new_shape = ctx.new_shape(node)
        old_shape = shape_of(node)
        ts = ctx.ts(node)
        changed = False
        for d in ts.dims:
            if d < len(sizes) and new_shape[d] != old_shape[d]:  # an unchanged size stays as written
                v = fill(ctx, d) if fill else new_shape[d]
                if sizes[d] != v:
                    sizes[d] = v
                    changed = True
        if not changed:
            return
        head = list(node.args[:start])
        if packed:
            if "size" in node.kwargs or "shape" in node.kwargs:
                key = "size" if "size" in node.kwargs else "shape"
                node.kwargs = {**node.kwargs, key: tuple(sizes)}
            else:
                node.args = tuple(head) + (tuple(sizes),)
        else:
            node.args = tuple(head) + tuple(sizes)

    return slim


