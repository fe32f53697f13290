"""Attention and the functional forms of layers: ``F.linear``, ``scaled_dot_product_attention``,
``einsum``, ``unbind``.

Heads are not declared here: a head is what the reshape rule makes of ``C -> (heads, head_dim)``
(every index of one head tied to one element), and these rules carry the head dimension through
the attention op like a batch dimension. ``scaled_dot_product_attention`` and a softmax over
``(..., heads, L, S)`` scores record their head space for the report
(:meth:`oba_fx.spaces.Builder.mark_heads`).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from oba_fx.ops import rule_for_function
    >>> rule_for_function(F.scaled_dot_product_attention).curvature.value
    'attention'
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from .. import attention as _attn
from ..spaces import EMPTY, Space, TensorSpaces
from .base import Ctx, FlopCtx, OpRule, numel, register, shape_of, tensor_spaces  # noqa: F401
from .generic import broadcast_dim, mark_primary, tie_or_pin
from oba_fx.errors import BadInputError


_tie_or_pin, _primary = tie_or_pin, mark_primary


# ============================================================================ F.linear
def _couple_flinear(ctx: Ctx) -> None:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if shape_of(w) is None or len(shape_of(w)) != 2:
        return ctx.barrier("F.linear with a weight that is not a 2-D tensor")
    nd = len(ctx.out_shape)
    carried = ctx.dim_map(x, {d: d for d in range(nd - 1)}, consumed=(nd - 1,))
    _tie_or_pin(ctx, tensor_spaces(x).at(nd - 1), tensor_spaces(w).at(1))
    out = ctx.new(nd - 1)
    if _tie_or_pin(ctx, out, tensor_spaces(w).at(0)) is None:
        ctx.b.pin(out)
    if isinstance(bias, torch.fx.Node):
        if _tie_or_pin(ctx, out, tensor_spaces(bias).at(0)) is None:
            ctx.b.pin(out)
    _primary(ctx, w, 0)
    ctx.set(TensorSpaces(tuple(carried.values()) + (out,)))


FLINEAR = register(
    OpRule("linear", _couple_flinear, None, lambda c: numel(c.inp(0)) * c.out[-1], "bilinear"),
    functions=(F.linear,),
)


# ============================================================================ SDPA
def _couple_sdpa(ctx: Ctx) -> None:
    """``softmax(q kᵀ · scale + mask) v`` over ``(..., L, E)`` queries and ``(..., S, E)`` keys.

    Batch dims (heads) are broadcast like an elementwise op over q, k, v and the mask; the
    contracted ``E`` of q and k is tied (and pinned when the default scale ``1/√E`` would
    change); the value dim passes to the output; token dims are tied (keys with values)."""
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    if ctx.node.kwargs.get("enable_gqa", False):
        return ctx.barrier("grouped-query attention (enable_gqa=True)")
    sq, sk, sv, so = shape_of(q), shape_of(k), shape_of(v), ctx.out_shape
    if None in (sq, sk, sv) or min(len(sq), len(sk), len(sv)) < 2 or not (len(sq) == len(sk) == len(sv)):
        return ctx.barrier("attention over operands of different ranks")
    nd = len(so)
    mask = mask if isinstance(mask, torch.fx.Node) and shape_of(mask) is not None else None
    ms = shape_of(mask) if mask is not None else None
    # contracted feature dim of q and k (the default scale reads its size: pin it)
    e = _tie_or_pin(ctx, tensor_spaces(q).at(nd - 1), tensor_spaces(k).at(nd - 1))
    if e is not None and ctx.arg(6, "scale") is None:
        ctx.b.pin(e)
    # key/value tokens (with the mask's last dim)
    _tie_or_pin(ctx, tensor_spaces(k).at(nd - 2), tensor_spaces(v).at(nd - 2),
                *([tensor_spaces(mask).at(len(ms) - 1)] if ms and ms[-1] == sk[-2] and sk[-2] > 1 else []))
    if ms and ms[-1] != sk[-2]:
        ctx.b.pin(tensor_spaces(mask).at(len(ms) - 1))
    spaces = []
    # query tokens -> output tokens (with the mask's second-last dim)
    qsp = [tensor_spaces(q).at(nd - 2)] + ([tensor_spaces(mask).at(len(ms) - 2)] if ms and len(ms) >= 2 and ms[-2] == sq[-2] else [])
    if ms and len(ms) >= 2 and ms[-2] != sq[-2]:
        ctx.b.pin(tensor_spaces(mask).at(len(ms) - 2))
    if any(s is not None for s in qsp):
        o = ctx.new(nd - 2)
        if _tie_or_pin(ctx, o, *qsp) is None:
            ctx.b.pin(o)
        spaces.append(o)
    # value features -> output features
    if tensor_spaces(v).at(nd - 1) is not None:
        o = ctx.new(nd - 1)
        ctx.b.union(tensor_spaces(v).at(nd - 1), o)
        spaces.append(o)
    # batch dims, heads included
    heads = None
    for d in range(nd - 2):
        o = broadcast_dim(ctx, [q, k, v] + ([mask] if mask is not None else []), d)
        if o is not None:
            spaces.append(o)
            if d == nd - 3:
                heads = o
    ctx.b.mark_heads(ctx.node, heads)
    ctx.set(TensorSpaces(tuple(spaces)))


def _sdpa_flops(c: FlopCtx) -> int:
    """The two matmuls ``q kᵀ`` and ``A v`` (fvcore does not count this op)."""
    q, k, v = (c.shape(c.node.args[i]) for i in range(3))
    batch = numel(c.out[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


SDPA = register(
    OpRule("scaled_dot_product_attention", _couple_sdpa, None, _sdpa_flops, "attention"),
    functions=(F.scaled_dot_product_attention,),
)


# ============================================================================ einsum
def _einsum_terms(ctx_node: torch.fx.Node) -> tuple[list[str], str, list[torch.fx.Node]]:
    eq = ctx_node.args[0]
    if not isinstance(eq, str):
        raise BadInputError("the equation is not a string")
    eq = eq.replace(" ", "")
    ops = list(ctx_node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if "->" not in eq or "." in eq:
        raise BadInputError("implicit output or '...' in the equation")
    ins, out = eq.split("->")
    terms = ins.split(",")
    if len(terms) != len(ops) or not all(isinstance(a, torch.fx.Node) for a in ops):
        raise BadInputError("operands are not all tensors")
    for t in terms + [out]:
        if len(set(t)) != len(t):
            raise BadInputError(f"repeated index in {t!r} (a diagonal)")
    return terms, out, ops


def _couple_einsum(ctx: Ctx) -> None:
    """Each output letter is broadcast like an elementwise dim over the operands that carry
    it; each summed letter ties the operands' spaces there (or pins them)."""
    terms, out, ops = _einsum_terms(ctx.node)
    spaces = []
    for od, letter in enumerate(out):
        found = [(a, t.index(letter)) for a, t in zip(ops, terms) if letter in t]
        tied, blocked = [], False
        for a, d in found:
            s = tensor_spaces(a).at(d)
            if shape_of(a)[d] != ctx.out_shape[od]:
                ctx.b.pin(s)
            elif s is None:
                blocked = blocked or ctx.out_shape[od] > 1
            else:
                tied.append(s)
        if tied and blocked:
            for s in tied:
                ctx.b.pin(s)
        elif tied:
            o = ctx.new(od)
            for s in tied:
                ctx.b.union(s, o)
            spaces.append(o)
    summed = {c for t in terms for c in t} - set(out)
    for letter in summed:
        _tie_or_pin(ctx, *[tensor_spaces(a).at(t.index(letter)) for a, t in zip(ops, terms) if letter in t])
    ctx.set(TensorSpaces(tuple(spaces)))


def _einsum_flops(c: FlopCtx) -> int:
    """A two-operand contraction: the product of the sizes of all its indices (fvcore's count,
    without its 4-significant-digit rounding); other einsums count zero."""
    try:
        terms, out, ops = _einsum_terms(c.node)
    except ValueError:
        return 0
    if len(ops) != 2:
        return 0
    size: dict[str, int] = {}
    for term, a in zip(terms, ops):
        size.update(zip(term, c.shape(a)))
    if not set(size) - set(out):
        return 0
    return math.prod(size.values())


EINSUM = register(OpRule("einsum", _couple_einsum, None, _einsum_flops, "bilinear"), functions=(torch.einsum,))


# ============================================================================ unbind
def _couple_unbind(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    nd = len(shape_of(x))
    d = ctx.arg(1, "dim", 0) % nd
    ctx.b.pin(tensor_spaces(x).at(d))
    outs = []
    for k in range(shape_of(x)[d]):
        spaces = []
        for xs in tensor_spaces(x).spaces:
            if xs.dim == d:
                continue
            od = xs.dim if xs.dim < d else xs.dim - 1
            o = ctx.b._new("tensor", f"{ctx.node.name}[{k}]", od, xs.size)
            ctx.b.union(xs, o)
            spaces.append(o)
        outs.append(TensorSpaces(tuple(spaces)))
    ctx.set(tuple(outs) if outs else EMPTY)


UNBIND = register(OpRule("unbind", _couple_unbind), functions=(torch.unbind,), methods=("unbind",))



# ============================================================================ mask helpers
def _couple_masks(ctx: Ctx) -> None:
    """Attention-mask arithmetic: masks carry no channels (their spaces, if any, are pinned)."""
    from .base import spaces_of, tensor_args

    ctx.b.pin_all([spaces_of(a) for a in tensor_args(ctx.node)])
    ctx.set(EMPTY)


MASKS = register(OpRule("attention_mask", _couple_masks, None, None, "smooth"),
                  functions=(_attn._merge_masks,))


# ============================================================================ Swin window attention
try:  # torch.fx-wrapped functions of torchvision's Swin Transformer
    from torchvision.models import swin_transformer as _swin
except ImportError:  # pragma: no cover
    _swin = None

_SWIN_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
              "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def _swin_arg(node: torch.fx.Node, name: str):
    i = _SWIN_ARGS.index(name)
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _couple_window_attention(ctx: Ctx) -> None:
    """Swin window attention: input width ↔ qkv columns; a head ↔ its rows of q, k and v in
    ``qkv_weight``/``qkv_bias``, its ``proj_weight`` columns, its relative-position-bias plane
    and its logit scale; output width ↔ ``proj_weight`` rows and ``proj_bias``."""
    a = {n: _swin_arg(ctx.node, n) for n in _SWIN_ARGS}
    x, wq, wp, heads_n = a["input"], a["qkv_weight"], a["proj_weight"], a["num_heads"]
    if shape_of(x) is None or len(shape_of(x)) != 4 or not isinstance(heads_n, int):
        return ctx.barrier("window attention on a non-4-D input or with a computed head count")
    for d in range(3):
        ctx.b.pin(tensor_spaces(x).at(d))
    _tie_or_pin(ctx, tensor_spaces(x).at(3), tensor_spaces(wq).at(1))
    rows = shape_of(wq)[0]
    dh = rows // (3 * heads_n)
    hub = ctx.b._new("tensor", f"{ctx.node.name}.heads", -1, heads_n)
    h_idx = np.repeat(np.arange(heads_n), dh)
    inner = np.arange(heads_n * dh)
    members = [(wq, 0, [j * heads_n * dh + inner for j in range(3)]), (a["qkv_bias"], 0, [j * heads_n * dh + inner for j in range(3)]),
               (wp, 1, [inner])]
    ok = True
    for t, d, idx_list in members:
        if t is None:
            continue
        s = tensor_spaces(t).at(d)
        if s is None:
            ok = False
            continue
        for idx in idx_list:
            ctx.b.union(hub, s, h_idx, idx)
    for t, d in ((a["relative_position_bias"], 1), (a["logit_scale"], 0)):
        if isinstance(t, torch.fx.Node):
            s = tensor_spaces(t).at(d) if shape_of(t) is not None and shape_of(t)[d] == heads_n else None
            if s is None:
                ok = False
            else:
                ctx.b.union(hub, s)
    if not ok:
        ctx.b.pin(hub)
    _primary(ctx, wq, 0)
    _primary(ctx, wp, 0)
    ctx.b.mark_heads(ctx.node, hub)
    out = ctx.new(3)
    for t in (wp, a["proj_bias"]):
        if t is not None and _tie_or_pin(ctx, out, tensor_spaces(t).at(0)) is None:
            ctx.b.pin(out)
    ctx.set(TensorSpaces((out,)))


def _slim_window_attention(ctx) -> None:
    """Swap in :func:`oba_fx.attention.window_attention` (head width from the weights) with
    the kept head count."""
    node = ctx.node
    hub = next((h.space for h in ctx.c.heads if h.node == node.name), None)
    n = int(ctx.kept(hub).size) if hub is not None else _swin_arg(node, "num_heads")
    args = {name: _swin_arg(node, name) for name in _SWIN_ARGS}
    args["num_heads"] = n
    node.target = _attn.window_attention
    node.args = tuple(args[k] for k in _SWIN_ARGS[:7])
    node.kwargs = {k: args[k] for k in _SWIN_ARGS[7:]}


def _window_attention_flops(c: FlopCtx) -> int:
    """fvcore's count for the opaque call: qkv and output projections over the padded tokens
    plus the two attention matmuls."""
    x = c.shape(c.node.args[0])
    ws = _swin_arg(c.node, "window_size")
    wq, wp = c.shape(_swin_arg(c.node, "qkv_weight")), c.shape(_swin_arg(c.node, "proj_weight"))
    b, h, w, cin = x
    t = b * -(-h // ws[0]) * ws[0] * -(-w // ws[1]) * ws[1]
    inner = wp[1]
    return t * cin * wq[0] + t * inner * wp[0] + 2 * t * ws[0] * ws[1] * inner


def _couple_rel_bias(ctx: Ctx) -> None:
    """``table[index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)``: heads pass to dim 1."""
    table = ctx.node.args[0]
    ctx.b.pin(tensor_spaces(table).at(0))
    s = tensor_spaces(table).at(1)
    if s is None:
        return ctx.set(EMPTY)
    o = ctx.new(1)
    ctx.b.union(s, o)
    ctx.set(TensorSpaces((o,)))


def _couple_patch_merging_pad(ctx: Ctx) -> None:
    """Pad H and W to even sizes, then the four 2x2 phases concatenated on channels."""
    x = ctx.node.args[0]
    nd = len(shape_of(x))
    for d in range(nd - 1):
        ctx.b.pin(tensor_spaces(x).at(d))
    s = tensor_spaces(x).at(nd - 1)
    if s is None:
        return ctx.set(EMPTY)
    o = ctx.new(nd - 1)
    for j in range(4):
        ctx.b.union(s, o, None, j * s.size + np.arange(s.size))
    ctx.set(TensorSpaces((o,)))


_WINDOW_FNS = (_attn.window_attention,) + ((_swin.shifted_window_attention,) if _swin else ())
WINDOW_ATTENTION = register(
    OpRule("window_attention", _couple_window_attention, _slim_window_attention, _window_attention_flops, "unknown"),
    functions=_WINDOW_FNS)
if _swin is not None:
    REL_BIAS = register(OpRule("relative_position_bias", _couple_rel_bias), functions=(_swin._get_relative_position_bias,))
    PATCH_MERGING_PAD = register(OpRule("patch_merging_pad", _couple_patch_merging_pad),
                                  functions=(_swin._patch_merging_pad,))


# ============================================================================ nn.MultiheadAttention kept whole
def _couple_mha_whole(ctx: Ctx) -> None:
    ctx.barrier("nn.MultiheadAttention kept whole (add_bias_kv/add_zero_attn, or inputs the traced stand-in "
                "does not take): its heads and inputs are not pruned")


def _mha_whole_flops(c: FlopCtx) -> int:
    """Projections and attention matmuls of a whole ``nn.MultiheadAttention`` call."""
    m = c.module
    q = shape_of(c.node.args[0])
    if q is None:
        return 0
    k = shape_of(c.node.args[1]) if len(c.node.args) > 1 and shape_of(c.node.args[1]) else q
    e = m.embed_dim
    nq, nk = math.prod(q[:-1]), math.prod(k[:-1])
    seq_q, seq_k = (q[1], k[1]) if m.batch_first else (q[0], k[0])
    batch = nq // seq_q
    return nq * e * e + 2 * nk * e * e + 2 * batch * seq_q * seq_k * e + nq * e * e


MHA_WHOLE = register(OpRule("multihead_attention_whole", _couple_mha_whole, None, _mha_whole_flops, "unknown"),
                     modules=(torch.nn.MultiheadAttention,))
