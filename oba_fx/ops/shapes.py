"""Shape ops: flatten/reshape, permute, (un)squeeze, expand, cat, stack, split, pad, roll, matmul, getitem."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import meta as M
from ..spaces import EMPTY, Space, TensorSpaces
from .base import Ctx, FlopCtx, OpRule, SlimCtx, node_arg, numel, register, shape_of, spaces_of, tensor_args, tensor_spaces
from .generic import broadcast_dim, couple_broadcast, norm_dims, size_args, couple_reshape, slim_sizes


# ============================================================================ shape ops
def _couple_flatten(ctx: Ctx) -> None:
    couple_reshape(ctx, tensor_args(ctx.node)[0])


FLATTEN = register(
    OpRule("flatten", _couple_flatten), modules=(nn.Flatten,), functions=(torch.flatten,),
    methods=("flatten",),
)
RESHAPE = register(
    OpRule("reshape", lambda c: couple_reshape(c), slim_sizes(1, None)),
    functions=(torch.reshape,), methods=("view", "reshape"),
)


def _couple_permute(ctx: Ctx) -> None:
    node = ctx.node
    nd = len(ctx.out_shape)
    tgt = node.target
    if tgt in ("permute", torch.permute):
        p = size_args(node, 1)[0] if tgt == "permute" else list(ctx.arg(1, "dims"))
        m = {p[k] % nd: k for k in range(nd)}
    elif tgt in ("t",):
        m = {0: 1, 1: 0} if nd == 2 else {0: 0}
    elif tgt in ("movedim", torch.movedim):
        src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [None] * nd
        for s_, d_ in zip(src, dst):
            order[d_ % nd] = s_ % nd
        rest = iter(d for d in range(nd) if d not in {s % nd for s in src})
        order = [o if o is not None else next(rest) for o in order]
        m = {order[k]: k for k in range(nd)}
    else:  # transpose / swapaxes
        d0, d1 = ctx.arg(1, "dim0") % nd, ctx.arg(2, "dim1") % nd
        m = {d: d for d in range(nd)}
        m[d0], m[d1] = d1, d0
    ctx.set(TensorSpaces(tuple(ctx.dim_map(node.args[0], m).values())))


PERMUTE = register(
    OpRule("permute", _couple_permute),
    functions=(torch.permute, torch.transpose, torch.swapaxes, torch.movedim),
    methods=("permute", "transpose", "swapaxes", "t", "movedim"),
)


def _couple_unsqueeze(ctx: Ctx) -> None:
    ish, osh = shape_of(ctx.node.args[0]), ctx.out_shape
    if ctx.node.target in ("unsqueeze", torch.unsqueeze):
        d = ctx.arg(1, "dim") % len(osh)
        m = {i: (i if i < d else i + 1) for i in range(len(ish))}
    else:  # squeeze
        dim = ctx.arg(1, "dim")
        dims = set(range(len(ish))) if dim is None else set(norm_dims(dim, len(ish)))
        dropped = {i for i in dims if ish[i] == 1}
        m, j = {}, 0
        for i in range(len(ish)):
            if i in dropped:
                m[i] = None
            else:
                m[i] = j
                j += 1
    ctx.set(TensorSpaces(tuple(ctx.dim_map(ctx.node.args[0], m).values())))


UNSQUEEZE = register(OpRule("unsqueeze", _couple_unsqueeze),
                      functions=(torch.unsqueeze, torch.squeeze), methods=("unsqueeze", "squeeze"))


def _couple_expand(ctx: Ctx) -> None:
    ish, osh = shape_of(ctx.node.args[0]), ctx.out_shape
    off = len(osh) - len(ish)
    ctx.set(TensorSpaces(tuple(ctx.dim_map(
        ctx.node.args[0], {i: (i + off if ish[i] == osh[i + off] else None) for i in range(len(ish))}).values())))


EXPAND = register(OpRule("expand", _couple_expand, slim_sizes(1, lambda c, d: -1)), methods=("expand",))


def _operands(seq: Any) -> list[tuple[tuple[int, ...], TensorSpaces]]:
    """(shape, spaces) of each tensor of ``cat``/``stack``'s sequence: a list of nodes, or one
    node whose value is a tuple (``torch.cat(x.chunk(2, 1), 1)``)."""
    if isinstance(seq, torch.fx.Node):
        tms, v = seq.meta.get(M.TENSOR_META), spaces_of(seq)
        if not isinstance(tms, (tuple, list)):
            raise TypeError("the sequence is neither a list of tensors nor a tuple-valued node")
        return [(tuple(int(n) for n in tm.shape), v[k] if isinstance(v, tuple) else EMPTY) for k, tm in enumerate(tms)]
    return [(shape_of(t), tensor_spaces(t)) for t in seq]


def _couple_cat(ctx: Ctx) -> None:
    ops = _operands(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces: list[Space] = []
    # the concatenated dim
    if any(ts.at(d) is not None for _, ts in ops):
        o = ctx.new(d)
        off = 0
        for sh, ts in ops:
            n = sh[d]
            s = ts.at(d)
            rng = np.arange(off, off + n)
            if s is None:
                ctx.b.pin(o, rng)
            else:
                ctx.b.union(s, o, None, rng)
            off += n
        spaces.append(o)
    for od in range(nd):  # every other dim: all inputs tied index by index
        if od != d:
            spaces.extend(_tie_inputs(ctx, ops, od, od))
    ctx.set(TensorSpaces(tuple(spaces)))


def _tie_inputs(ctx: Ctx, ops: list, in_dim: int, out_dim: int) -> list[Space]:
    """Tie dim ``in_dim`` of every input (``(shape, spaces)``, one shape) to ``out_dim`` of the output."""
    tied = [ts.at(in_dim) for _, ts in ops]
    if all(s is None for s in tied):
        return []
    if any(s is None for s in tied) and ctx.out_shape[out_dim] > 1:
        for s in tied:
            ctx.b.pin(s)
        return []
    o = ctx.new(out_dim)
    for s in tied:
        if s is not None:
            ctx.b.union(s, o)
    return [o]


CAT = register(OpRule("cat", _couple_cat), functions=(torch.cat, torch.concat, torch.concatenate))


def _couple_stack(ctx: Ctx) -> None:
    ops = _operands(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces = [o for idim in range(nd - 1) for o in _tie_inputs(ctx, ops, idim, idim if idim < d else idim + 1)]
    ctx.set(TensorSpaces(tuple(spaces)))


STACK = register(OpRule("stack", _couple_stack), functions=(torch.stack,))


def _split_dim(ctx) -> int:
    nd = len(shape_of(ctx.node.args[0]))
    return ctx.arg(2, "dim", 0) % nd


def _couple_split(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    tms = ctx.node.meta.get(M.TENSOR_META)
    d = _split_dim(ctx)
    s = tensor_spaces(x).at(d)
    nd = len(shape_of(x))
    outs = []
    off = 0
    for k, tm in enumerate(tms):
        sh = tuple(tm.shape)
        spaces = []
        for xs in tensor_spaces(x).spaces:
            o = ctx.b._new("tensor", f"{ctx.node.name}[{k}]", xs.dim, sh[xs.dim])
            if xs.dim == d:
                ctx.b.union(xs, o, np.arange(off, off + sh[d]))
            else:
                ctx.b.union(xs, o)
            spaces.append(o)
        off += sh[d]
        outs.append(TensorSpaces(tuple(spaces)))
    del s, nd
    ctx.set(tuple(outs))


def _slim_split(ctx: SlimCtx) -> None:
    node = ctx.node
    x = node.args[0]
    d = _split_dim(ctx)
    if tensor_spaces(x).at(d) is None:
        return
    sizes = []
    for k, tm in enumerate(node.meta[M.TENSOR_META]):
        o = node.meta[M.SPACES][k].at(d)
        sizes.append(int(ctx.kept(o).size))
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (x, sizes), {"dim": d}


SPLIT = register(OpRule("split", _couple_split, _slim_split),
                  functions=(torch.split, torch.chunk, torch.tensor_split), methods=("split", "chunk"))


def _couple_pad(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    pad = list(ctx.arg(1, "pad"))
    ish = shape_of(x)
    nd = len(ish)
    amounts = {nd - 1 - k // 2: (pad[k], pad[k + 1]) for k in range(0, len(pad), 2)}
    spaces = []
    for d in range(nd):
        s = tensor_spaces(x).at(d)
        lo, hi = amounts.get(d, (0, 0))
        if lo < 0 or hi < 0:
            ctx.b.pin(s)
            continue
        if s is None and lo == hi == 0:
            continue
        o = ctx.new(d)
        inner = np.arange(lo, lo + ish[d])
        if s is None:  # only the padding indices can go
            ctx.b.pin(o, inner)
        else:
            ctx.b.union(s, o, None, inner)
        spaces.append(o)
    ctx.set(TensorSpaces(tuple(spaces)))


def _slim_pad(ctx: SlimCtx) -> None:
    node = ctx.node
    x = node.args[0]
    pad = list(node_arg(node, 1, "pad"))
    nd = len(shape_of(x))
    for o in ctx.ts(node).spaces:
        k = 2 * (nd - 1 - o.dim)
        if k + 1 >= len(pad):
            continue
        lo, hi = pad[k], pad[k + 1]
        kept = ctx.kept(o)
        pad[k] = int((kept < lo).sum())
        pad[k + 1] = int((kept >= o.size - hi).sum())
    if len(node.args) > 1:
        node.args = (x, tuple(pad)) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(pad)}


PAD = register(OpRule("pad", _couple_pad, _slim_pad), functions=(F.pad,))


def _couple_roll(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    nd = len(shape_of(x))
    dims = ctx.arg(2, "dims")
    if dims is None:
        return ctx.barrier("roll without dims mixes every dimension")
    rolled = set(norm_dims(dims, nd))
    ctx.set(TensorSpaces(tuple(ctx.dim_map(x, {d: (None if d in rolled else d) for d in range(nd)}).values())))


ROLL = register(OpRule("roll", _couple_roll), functions=(torch.roll,), methods=("roll",))


def _couple_matmul(ctx: Ctx) -> None:
    a, b = ctx.node.args[0], ctx.node.args[1]
    sa, sb, so = shape_of(a), shape_of(b), ctx.out_shape
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return ctx.barrier("matmul with a 1-D or non-tensor operand")
    ka, kb = tensor_spaces(a).at(len(sa) - 1), tensor_spaces(b).at(len(sb) - 2)
    if ka is not None and kb is not None:
        ctx.b.union(ka, kb)
    else:
        ctx.b.pin(ka)
        ctx.b.pin(kb)
    spaces = []
    nd = len(so)
    ra, rb = tensor_spaces(a).at(len(sa) - 2), tensor_spaces(b).at(len(sb) - 1)
    for src, od in ((ra, nd - 2), (rb, nd - 1)):
        if src is not None:
            o = ctx.new(od)
            ctx.b.union(src, o)
            spaces.append(o)
    for d in range(nd - 2):  # batch dims broadcast like an elementwise op
        o = broadcast_dim(ctx, [a, b], d)
        if o is not None:
            spaces.append(o)
    ctx.set(TensorSpaces(tuple(spaces)))


def _matmul_flops(c: FlopCtx) -> int:
    return numel(c.out) * c.shape(c.node.args[0])[-1]


MATMUL = register(OpRule("matmul", _couple_matmul, None, _matmul_flops, "bilinear"),
                   functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"))


# ---- getitem --------------------------------------------------------------------------
def _couple_getitem(ctx: Ctx) -> None:
    src, idx = ctx.node.args
    v = spaces_of(src)
    if isinstance(v, tuple):  # element of a split / chunk result
        ctx.set(v[idx] if isinstance(idx, int) else EMPTY)
        if not isinstance(idx, int):
            ctx.b.pin_all(v)
        return
    if not isinstance(v, TensorSpaces) or shape_of(src) is None:
        return ctx.set(EMPTY if ctx.out_shape is not None else None)
    idx = idx if isinstance(idx, tuple) else (idx,)
    ish = shape_of(src)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(ish) - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (len(ish) - sum(1 for i in expanded if i is not None)))
    spaces, d, od = [], 0, 0
    advanced = any(isinstance(i, torch.fx.Node) for i in expanded)
    strided = False
    for i in expanded:
        if i is None:
            od += 1
            continue
        s = v.at(d)
        if isinstance(i, slice):
            if s is None:
                pass
            elif any(isinstance(x, torch.fx.Node) for x in (i.start, i.stop, i.step)):
                ctx.pin_because(s, "a slice with computed bounds (sized from a shape) would keep the old "
                                   "channel count: the sliced channels are pinned")
            else:
                start, stop, step = i.indices(ish[d])
                if step != 1 and (strided or advanced):
                    ctx.pin_because(s, "a strided slice next to another strided slice or a tensor index: "
                                       "its channels are pinned")
                else:  # out index j <-> in index start + j*step; indices outside are free here
                    strided = strided or step != 1
                    o = ctx.new(od)
                    ctx.b.union(s, o, np.arange(start, stop, step))
                    spaces.append(o)
            d += 1
            od += 1
        elif isinstance(i, int):
            ctx.b.pin(s)
            d += 1
        elif _single_gather(i, expanded):  # x[idx]: gathers along d, other dims pass
            ctx.b.pin(s)
            ctx.b.pin_all(spaces_of(i))  # the index's own dims are not carried
            d += 1
            od += len(shape_of(i))
        else:
            return ctx.barrier("indexing with a boolean mask, a list, or several tensors")
    ctx.set(TensorSpaces(tuple(spaces)))


def _single_gather(i: Any, expanded: list) -> bool:
    """``i`` is the only advanced index (an integer tensor) among slices: torch puts its dims
    where it stands."""
    if not isinstance(i, torch.fx.Node) or shape_of(i) is None:
        return False
    tm = i.meta.get(M.TENSOR_META)
    if tm is None or tm.dtype in (torch.bool, torch.uint8) or tm.dtype.is_floating_point:
        return False
    return all(x is i or isinstance(x, slice) or x is None for x in expanded)


def _slim_getitem(ctx: SlimCtx) -> None:
    """Slices over spaced dims select the kept indices of the slimmed input: a slice when they
    are evenly spaced, else (a strided slice that lost some) an index tensor held as a buffer."""
    src, idx = ctx.node.args
    v = spaces_of(src)
    if not isinstance(v, TensorSpaces) or not v.spaces:
        return
    was_tuple = isinstance(idx, tuple)
    idx = list(idx) if was_tuple else [idx]
    ish = shape_of(src)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    d, changed, out = 0, False, []
    for i in idx:
        if i is Ellipsis:
            d += len(ish) - n_real
            out.append(i)
            continue
        if i is None:
            out.append(i)
            continue
        s = v.at(d)
        computed = isinstance(i, slice) and any(isinstance(x, torch.fx.Node) for x in (i.start, i.stop, i.step))
        if isinstance(i, slice) and s is not None and i != slice(None) and not computed:
            sel = np.arange(*i.indices(ish[d]))
            kept = ctx.kept(s)
            pos = np.searchsorted(kept, sel[np.isin(sel, kept)])  # where the kept selected indices now are
            out.append(_select(ctx, pos, d))
            changed = True
        else:
            out.append(i)
        d += 1
    if changed:
        ctx.node.args = (src, tuple(out) if was_tuple else out[0])


def _select(ctx: SlimCtx, pos: np.ndarray, d: int) -> Any:
    """A slice picking the positions ``pos`` (increasing) when evenly spaced, else an index
    tensor (a buffer of the graph module read with ``get_attr``)."""
    steps = np.unique(np.diff(pos))
    if pos.size == 0:
        return slice(0, 0, None)
    if pos.size == 1 or (steps.size == 1 and steps[0] > 0):
        step = int(steps[0]) if pos.size > 1 else 1
        return slice(int(pos[0]), int(pos[-1]) + 1, None if step == 1 else step)
    name = f"_oba_index_{ctx.node.name}_{d}"
    ctx.gm.register_buffer(name, torch.as_tensor(pos, dtype=torch.long))
    with ctx.gm.graph.inserting_before(ctx.node):
        return ctx.gm.graph.get_attr(name)


GETITEM = register(OpRule("getitem", _couple_getitem, _slim_getitem), functions=(operator.getitem,))




# ---- reshape_as, narrow, max/min over a dim ------------------------------------------------
def _couple_reshape_as(ctx: Ctx) -> None:
    """``x.reshape_as(other)`` / ``x.view_as(other)``: a reshape to ``other``'s shape, which
    slimming changes with ``other``'s channels: each output space is tied to ``other``'s space
    there, and a dim spaced on one side only is pinned on that side."""
    x, other = ctx.node.args[0], ctx.node.args[1]
    couple_reshape(ctx, x)
    out, ots = tensor_spaces(ctx.node), tensor_spaces(other)
    kept = []
    for d in range(len(ctx.out_shape)):
        o, s = out.at(d), ots.at(d)
        if o is not None and s is not None:
            ctx.b.union(o, s)
        elif o is not None or s is not None:
            ctx.pin_because(o or s, f"{ctx.node.target}: dim {d} is sized by the other tensor, whose channels "
                                    "are not those of the reshaped one: pinned")
        if o is not None:
            kept.append(o)
    ctx.set(TensorSpaces(tuple(kept)))


RESHAPE_AS = register(OpRule("reshape_as", _couple_reshape_as), methods=("reshape_as", "view_as"))


def _couple_narrow(ctx: Ctx) -> None:
    """``narrow(x, dim, start, length)``: ``x[..., start:start + length]`` along ``dim``."""
    x = ctx.node.args[0]
    nd = len(shape_of(x))
    d, start, length = ctx.arg(1, "dim") % nd, ctx.arg(2, "start"), ctx.arg(3, "length")
    sp = ctx.dim_map(x, {k: k for k in range(nd)}, consumed=(d,))
    s = tensor_spaces(x).at(d)
    if s is not None:
        if not (isinstance(start, int) and isinstance(length, int)):
            ctx.pin_because(s, "narrow with a computed start or length: the narrowed channels are pinned")
        else:
            o = sp[d] = ctx.new(d)
            ctx.b.union(s, o, np.arange(start % s.size, start % s.size + length))
    ctx.set(TensorSpaces(tuple(sp[k] for k in sorted(sp))))


def _slim_narrow(ctx: SlimCtx) -> None:
    node = ctx.node
    x = node.args[0]
    nd = len(shape_of(x))
    d, start, length = ctx.arg(1, "dim") % nd, ctx.arg(2, "start"), ctx.arg(3, "length")
    s = tensor_spaces(x).at(d)
    if s is None or not (isinstance(start, int) and isinstance(length, int)):
        return
    kept = ctx.kept(s)
    start %= s.size
    new_start = int((kept < start).sum())
    new_len = int((kept < start + length).sum()) - new_start
    args = [x, ctx.arg(1, "dim"), new_start, new_len]
    node.args, node.kwargs = tuple(args), {}


NARROW = register(OpRule("narrow", _couple_narrow, _slim_narrow), functions=(torch.narrow,), methods=("narrow",))


def _couple_max_min(ctx: Ctx) -> None:
    """``x.max(dim)`` / ``x.min(dim)``: ``(values, indices)``, the dim reduced (its spaces
    pinned: the index of the maximum counts channels), the other dims passed to both;
    ``x.max()`` reduces everything; ``torch.max(a, b)`` is elementwise."""
    x = ctx.node.args[0]
    second = ctx.arg(1, "dim", ctx.node.kwargs.get("other"))
    if isinstance(second, torch.fx.Node) and shape_of(second) is not None:  # torch.max(a, b)
        return couple_broadcast(ctx)
    nd = len(shape_of(x))
    if second is None:
        ctx.b.pin_all(spaces_of(x))
        return ctx.set(EMPTY)
    if not isinstance(second, int):
        return ctx.barrier("max/min over a computed dim")
    d = second % nd
    keep = bool(ctx.arg(2, "keepdim", False))
    outs = []
    for k in range(2):
        spaces = []
        for xs in tensor_spaces(x).spaces:
            if xs.dim == d:
                ctx.b.pin(xs)
                continue
            od = xs.dim if (xs.dim < d or keep) else xs.dim - 1
            o = ctx.b._new("tensor", f"{ctx.node.name}[{k}]", od, xs.size)
            ctx.b.union(xs, o)
            spaces.append(o)
        outs.append(TensorSpaces(tuple(spaces)))
    ctx.set(tuple(outs))


MAX_MIN = register(OpRule("max_min", _couple_max_min, None, None, "piecewise"),
                   functions=(torch.max, torch.min), methods=("max", "min"))


def _couple_result_field(ctx: Ctx) -> None:
    """``r.values`` / ``r.indices`` of a ``max``/``min``/``sort``/``topk`` result (an ``x.shape`` is a size node)."""
    src, name = ctx.node.args
    v = spaces_of(src)
    fields = {"values": 0, "indices": 1}
    if not isinstance(v, tuple) or name not in fields:
        return ctx.barrier(f"attribute {name!r} of a value that is not a (values, indices) result")
    ctx.set(v[fields[name]])


RESULT_FIELD = register(OpRule("result_field", _couple_result_field), functions=(getattr,))
