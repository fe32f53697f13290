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
from .generic import broadcast_dim, norm_dims, size_args, couple_reshape, slim_sizes


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


def _couple_cat(ctx: Ctx) -> None:
    tensors = list(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces: list[Space] = []
    # the concatenated dim
    if any(tensor_spaces(t).at(d) is not None for t in tensors):
        o = ctx.new(d)
        off = 0
        for t in tensors:
            n = shape_of(t)[d]
            s = tensor_spaces(t).at(d)
            rng = np.arange(off, off + n)
            if s is None:
                ctx.b.pin(o, rng)
            else:
                ctx.b.union(s, o, None, rng)
            off += n
        spaces.append(o)
    for od in range(nd):  # every other dim: all inputs tied index by index
        if od != d:
            spaces.extend(_tie_inputs(ctx, tensors, od, od))
    ctx.set(TensorSpaces(tuple(spaces)))


def _tie_inputs(ctx: Ctx, tensors: list, in_dim: int, out_dim: int) -> list[Space]:
    """Tie dim ``in_dim`` of every input to ``out_dim`` of the output (inputs of one shape)."""
    tied = [tensor_spaces(t).at(in_dim) for t in tensors]
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
    tensors = list(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces = [o for idim in range(nd - 1) for o in _tie_inputs(ctx, tensors, idim, idim if idim < d else idim + 1)]
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
    for i in expanded:
        if i is None:
            od += 1
            continue
        s = v.at(d)
        if isinstance(i, slice):
            if s is not None:
                start, stop, step = i.indices(ish[d])
                if step != 1 or any(isinstance(x, torch.fx.Node) for x in (i.start, i.stop, i.step)):
                    ctx.b.pin(s)
                else:
                    o = ctx.new(od)
                    ctx.b.union(s, o, np.arange(start, stop))
                    if stop - start < s.size:
                        pass  # indices outside the slice are free on this path
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
        if isinstance(i, slice) and s is not None and i != slice(None):
            start, stop, _ = i.indices(ish[d])
            kept = ctx.kept(s)
            out.append(slice(int((kept < start).sum()), int((kept < stop).sum()), None))
            changed = True
        else:
            out.append(i)
        d += 1
    if changed:
        ctx.node.args = (src, tuple(out) if was_tuple else out[0])


GETITEM = register(OpRule("getitem", _couple_getitem, _slim_getitem), functions=(operator.getitem,))


