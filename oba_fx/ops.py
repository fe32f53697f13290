"""The one op table: how each supported op couples channels, is slimmed, counts FLOPs, and
which second-derivative class it belongs to.

Each op is declared once, as an :class:`OpRule`, and registered for the module types,
functions and tensor-method names that mean it. An op that is not in the table is a
*barrier*: every space it touches is pinned, and the report lists it. Nothing is guessed.

FLOPs follow fvcore's convention (one multiply-add = one FLOP; convolutions, linear maps,
matmuls, norms, adaptive average pooling and upsampling are counted; elementwise ops are not),
for the batch size of the example inputs.

Curvature classes (used by the Hessian-structure analysis):
    ``"layer"``     parameterised affine map, bilinear in (parameter, input): conv, linear, BN.
    ``"linear"``    linear in its tensor inputs, no second derivative: add, cat, reshape, pad.
    ``"piecewise"`` piecewise linear, zero second derivative almost everywhere: ReLU, max-pool.
    ``"bilinear"``  product of two inputs: mul, div, matmul.
    ``"smooth"``    non-zero second derivative: GELU, sigmoid, softmax, LayerNorm.
    ``"none"``      does not carry tensors (size arithmetic).

Example:
    >>> rule_for_module(torch.nn.Conv2d(3, 8, 3)).name
    'conv'
    >>> rule_for_function(torch.cat).name
    'cat'
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from . import meta as M
from .coupling import EMPTY, Builder, Space, TensorSpaces, _State, iter_spaces


# ============================================================================ the rule type
@dataclass(frozen=True)
class OpRule:
    """How one op is handled everywhere in the pipeline.

    Attributes:
        name: short name used in reports.
        couple: ``fn(ctx: Ctx) -> None``; sets the node's spaces and records unions/pins.
        slim: ``fn(ctx: SlimCtx) -> None``; rewrites the module or the node's constants.
        flops: ``fn(ctx: FlopCtx) -> int``; ``None`` counts zero.
        curvature: second-derivative class (module docstring).
    """

    name: str
    couple: Callable[["Ctx"], None]
    slim: Callable[["SlimCtx"], None] | None = None
    flops: Callable[["FlopCtx"], int] | None = None
    curvature: str = "linear"


MODULE_RULES: dict[type, OpRule] = {}
FUNCTION_RULES: dict[Any, OpRule] = {}
METHOD_RULES: dict[str, OpRule] = {}


def _register(rule: OpRule, modules=(), functions=(), methods=()) -> OpRule:
    for m in modules:
        MODULE_RULES[m] = rule
    for f in functions:
        FUNCTION_RULES[f] = rule
    for name in methods:
        METHOD_RULES[name] = rule
    return rule


def rule_for_module(module: nn.Module) -> OpRule | None:
    """The rule of a leaf module, by exact type (a subclass may override ``forward``)."""
    return MODULE_RULES.get(type(module))


def rule_for_function(fn: Any) -> OpRule | None:
    return FUNCTION_RULES.get(fn)


def rule_for_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpRule | None:
    """The rule that applies to ``node``, or ``None`` (a barrier)."""
    if node.op == "call_module":
        return rule_for_module(gm.get_submodule(node.target))
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


# ============================================================================ contexts
def _shape(arg: Any) -> tuple[int, ...] | None:
    if isinstance(arg, torch.fx.Node):
        tm = arg.meta.get(M.TENSOR_META)
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
    return None


def _spaces(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get(M.SPACES)
    return None


def _ts(arg: Any) -> TensorSpaces:
    v = _spaces(arg)
    return v if isinstance(v, TensorSpaces) else EMPTY


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            if _shape(a) is not None:
                out.append(a)
        elif isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


class Ctx:
    """What a coupling rule sees: the node, its module, input spaces and the builder."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, b: Builder, state: _State):
        self.gm, self.node, self.b, self.state = gm, node, b, state

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return _shape(self.node)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.node, i, name, default)

    def ts(self, arg: Any) -> TensorSpaces:
        return _ts(arg)

    def new(self, dim: int, size: int | None = None) -> Space:
        size = self.out_shape[dim] if size is None else size
        return self.b.tensor_space(self.node, dim, size)

    def param(self, attr: str, dim: int, primary: bool = True) -> Space:
        t = getattr(self.module, attr)
        return self.b.param_space(f"{self.node.target}.{attr}", dim, t.shape[dim], primary)

    def set(self, value: Any) -> None:
        self.node.meta[M.SPACES] = value

    def barrier(self, reason: str) -> None:
        barrier(self.node, self.b, reason)

    def dim_map(self, src: Any, mapping: dict[int, int | None], consumed: tuple[int, ...] = ()) -> dict[int, Space]:
        """Carry ``src``'s spaces to the output along ``mapping`` (in dim -> out dim); a space
        whose dim maps to ``None`` (or is missing) is pinned, unless the rule itself handles
        it (``consumed``). Returns the new out spaces by out dim."""
        out: dict[int, Space] = {}
        for s in _ts(src).spaces:
            if s.dim in consumed:
                continue
            od = mapping.get(s.dim)
            if od is None:
                self.b.pin(s)
                continue
            o = self.new(od)
            if o.size != s.size:
                self.b.pin(s)
                continue
            self.b.union(s, o)
            out[od] = o
        return out


def barrier(node: torch.fx.Node, b: Builder, reason: str) -> None:
    """Make ``node`` a barrier: pin every space it reads, give its value no spaces."""
    for a in _tensor_args(node):
        b.pin_all(_spaces(a))
    b.barrier(node, reason)
    v = node.meta.get(M.TENSOR_META)
    node.meta[M.SPACES] = EMPTY if v is None or hasattr(v, "shape") else tuple(EMPTY for _ in v)


# ============================================================================ generic rules
def couple_broadcast(ctx: Ctx, args: list[Any] | None = None) -> None:
    """Elementwise op over broadcast operands: out dim d is tied to every operand's dim d."""
    out = ctx.out_shape
    if out is None:
        return ctx.set(EMPTY)
    args = _tensor_args(ctx.node) if args is None else args
    nd = len(out)
    spaces: list[Space] = []
    for d in range(nd):
        tied: list[Space] = []
        blocked = False
        for a in args:
            sh = _shape(a)
            ad = d - (nd - len(sh))
            if ad < 0:
                continue
            s = _ts(a).at(ad)
            if sh[ad] != out[d]:  # broadcast from size 1
                ctx.b.pin(s)
                continue
            if s is None:
                blocked = blocked or out[d] > 1
            else:
                tied.append(s)
        if not tied:
            continue
        if blocked:  # an operand we cannot slice spans this dim
            for s in tied:
                ctx.b.pin(s)
            continue
        o = ctx.new(d)
        for s in tied:
            ctx.b.union(s, o)
        spaces.append(o)
    ctx.set(TensorSpaces(tuple(spaces)))


def couple_first(ctx: Ctx) -> None:
    """Same shape as the first argument, index by index (contiguous, clone, to, ...)."""
    src = ctx.node.args[0]
    if _shape(src) != ctx.out_shape:
        return ctx.barrier("output shape differs from input shape")
    ctx.set(TensorSpaces(tuple(ctx.dim_map(src, {d: d for d in range(len(ctx.out_shape))}).values())))


def couple_keep_dims(keep: Callable[[int], bool]) -> Callable[[Ctx], None]:
    """Ops that act within some dims (pooling, upsampling): spaces on kept dims pass."""

    def couple(ctx: Ctx) -> None:
        src = _tensor_args(ctx.node)[0]
        nd = len(_shape(src))
        m = {d: (d if keep(d) and d < len(ctx.out_shape) else None) for d in range(nd)}
        for d, od in list(m.items()):
            if od is not None and _shape(src)[d] != ctx.out_shape[od]:
                m[d] = None
        ctx.set(TensorSpaces(tuple(ctx.dim_map(src, m).values())))

    return couple


couple_spatial = couple_keep_dims(lambda d: d < 2)


def _norm_dims(d: Any, nd: int) -> tuple[int, ...] | None:
    if d is None:
        return None
    if isinstance(d, int):
        d = (d,)
    return tuple(sorted(x % nd for x in d))


def couple_reduce(ctx: Ctx) -> None:
    """mean/sum/amax/... over ``dim``: reduced dims are pinned, the others pass."""
    src = ctx.node.args[0]
    nd = len(_shape(src))
    dims = _norm_dims(ctx.arg(1, "dim"), nd)
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
        src = _tensor_args(ctx.node)[0]
        nd = len(_shape(src))
        d = getattr(ctx.module, from_module) if from_module else ctx.arg(*dim_arg, default)
        if d is None:
            return ctx.barrier("dim=None mixes every dimension")
        d %= nd
        ctx.set(TensorSpaces(tuple(ctx.dim_map(src, {x: (None if x == d else x) for x in range(nd)}).values())))

    return couple


def couple_last_dims_mixed(k_of: Callable[[Ctx], int]) -> Callable[[Ctx], None]:
    """LayerNorm-like: statistics over the last k dims, so they are pinned."""

    def couple(ctx: Ctx) -> None:
        src = _tensor_args(ctx.node)[0]
        nd = len(_shape(src))
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
    features c*HW..c*HW+HW-1; split into heads -> a head is one unit)."""
    src = ctx.node.args[0] if src is None else src
    ish, osh = _shape(src), ctx.out_shape
    groups = reshape_groups(ish, osh)
    ts = _ts(src)
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
            k = vary[0]
            od = go[k]
            o = out.get(od) or ctx.new(od)
            out[od] = o
            moved = np.moveaxis(val, k, 0).reshape(val.shape[k], -1)
            # out index j is tied to every input index in moved[j]
            cols = moved.shape[1]
            ctx.b.union(s, o, moved.ravel(), np.repeat(np.arange(o.size), cols))
    ctx.set(TensorSpaces(tuple(out.values())))


def _size_args(node: torch.fx.Node, start: int) -> tuple[list[Any], bool]:
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
        sizes, packed = _size_args(node, start)
        new_shape = ctx.new_shape(node)
        ts = ctx.ts(node)
        changed = False
        for d in ts.dims:
            if d < len(sizes):
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


# ============================================================================ slim / flops contexts
class SlimCtx:
    """What a slim rule sees: the node in the graph being slimmed and the kept indices."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, coupling, removed: np.ndarray):
        self.gm, self.node, self.c, self.removed = gm, node, coupling, removed

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def ts(self, arg: Any) -> TensorSpaces:
        return _ts(arg)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.node, i, name, default)

    def kept(self, space: Space) -> np.ndarray:
        return self.c.kept(space, self.removed)

    def new_shape(self, arg: Any) -> tuple[int, ...]:
        return new_shape(arg, self.c, self.removed)

    def param_kept(self, attr: str, dim: int) -> torch.Tensor | None:
        """Kept indices of ``module.attr`` along ``dim``; ``None`` when nothing is removed."""
        s = self.c.param_spaces.get((f"{self.node.target}.{attr}", dim))
        if s is None:
            return None
        k = self.kept(s)
        return None if k.size == s.size else torch.as_tensor(k, dtype=torch.long)


def new_shape(arg: Any, c, removed: np.ndarray) -> tuple[int, ...]:
    """Shape of a node's value after removing the units in ``removed``."""
    sh = list(_shape(arg))
    for s in _ts(arg).spaces:
        sh[s.dim] = int((~removed[c.units_of(s)]).sum())
    return tuple(sh)


class FlopCtx:
    """What a FLOPs rule sees: shapes of the node and its inputs, before or after removal."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, shape_fn: Callable[[Any], tuple]):
        self.gm, self.node, self.shape = gm, node, shape_fn

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    @property
    def out(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def inp(self, i: int = 0) -> tuple[int, ...]:
        return self.shape(_tensor_args(self.node)[i])


def slice_attr(module: nn.Module, attr: str, dim: int, idx: torch.Tensor | None) -> None:
    """Replace ``module.attr`` by its rows ``idx`` along ``dim`` (keeps Parameter-ness)."""
    if idx is None:
        return
    t = getattr(module, attr)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    setattr(module, attr, new)


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


# ============================================================================ layers
def _conv_spaces(ctx: Ctx, transposed: bool) -> None:
    """Conv: weight (out, in/g, k..) or, transposed, (in, out/g, k..).

    groups == 1: out channel i <-> weight row i <-> bias i; input channel j <-> weight column j.
    groups > 1 (depthwise included): a whole group (its input block, output block, weight rows
    and bias entries) is one unit, so slimming removes groups and rewrites ``groups``.
    """
    m = ctx.module
    g = m.groups
    xs = _ts(ctx.node.args[0]).at(1)
    out = ctx.new(1)
    bias = ctx.param("bias", 0) if m.bias is not None else None
    if bias is not None:
        ctx.b.union(out, bias)
    if g == 1:
        w_out = ctx.param("weight", 1 if transposed else 0)
        w_in = ctx.param("weight", 0 if transposed else 1)
        ctx.b.union(out, w_out)
        if xs is None:
            ctx.b.pin(w_in)
        else:
            ctx.b.union(xs, w_in)
        return ctx.set(TensorSpaces((out,)))
    ipg, opg = m.in_channels // g, m.out_channels // g
    w_rows = ctx.param("weight", 0)  # blocks of opg rows (conv) / ipg rows (transposed)
    rpg = ipg if transposed else opg
    if xs is None:
        ctx.b.pin(out)
    for k in range(g):
        els = [out.elements(np.arange(k * opg, (k + 1) * opg)),
               w_rows.elements(np.arange(k * rpg, (k + 1) * rpg))]
        if xs is not None:
            els.append(xs.elements(np.arange(k * ipg, (k + 1) * ipg)))
        ctx.b.union_many(np.concatenate(els))
    ctx.set(TensorSpaces((out,)))


def _slim_conv(ctx: SlimCtx, transposed: bool) -> None:
    m = ctx.module
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    if m.bias is not None:
        slice_attr(m, "bias", 0, ctx.param_kept("bias", 0))
    if g == 1:
        slice_attr(m, "weight", 0, ctx.param_kept("weight", 0))
        slice_attr(m, "weight", 1, ctx.param_kept("weight", 1))
        m.in_channels, m.out_channels = (m.weight.shape[0], m.weight.shape[1]) if transposed else \
            (m.weight.shape[1], m.weight.shape[0])
        return
    slice_attr(m, "weight", 0, ctx.param_kept("weight", 0))
    m.groups = m.weight.shape[0] // (ipg if transposed else opg)
    m.in_channels, m.out_channels = ipg * m.groups, opg * m.groups


def _flops_conv(ctx: FlopCtx, transposed: bool) -> int:
    m = ctx.module
    ishape, oshape = ctx.inp(0), ctx.out
    k = math.prod(m.kernel_size)
    if m.groups == 1:
        cin, cout_pg = ishape[1], oshape[1]
        w = cout_pg * cin * k
    else:
        ipg, opg = m.in_channels // m.groups, m.out_channels // m.groups
        g_new = ishape[1] // ipg
        w = g_new * ipg * opg * k
    spatial = ishape[2:] if transposed else oshape[2:]
    return int(ishape[0] * w * math.prod(spatial))


CONV = _register(
    OpRule("conv", lambda c: _conv_spaces(c, False), lambda c: _slim_conv(c, False),
           lambda c: _flops_conv(c, False), "layer"),
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
)
CONV_T = _register(
    OpRule("conv_transpose", lambda c: _conv_spaces(c, True), lambda c: _slim_conv(c, True),
           lambda c: _flops_conv(c, True), "layer"),
    modules=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
)


def _couple_linear(ctx: Ctx) -> None:
    m = ctx.module
    x = ctx.node.args[0]
    nd = len(ctx.out_shape)
    carried = ctx.dim_map(x, {d: d for d in range(nd - 1)}, consumed=(nd - 1,))
    xs = _ts(x).at(nd - 1)
    w_in = ctx.param("weight", 1)
    if xs is None:
        ctx.b.pin(w_in)
    else:
        ctx.b.union(xs, w_in)
    out = ctx.new(nd - 1)
    ctx.b.union(out, ctx.param("weight", 0))
    if m.bias is not None:
        ctx.b.union(out, ctx.param("bias", 0))
    ctx.set(TensorSpaces(tuple(carried.values()) + (out,)))


def _slim_linear(ctx: SlimCtx) -> None:
    m = ctx.module
    slice_attr(m, "weight", 0, ctx.param_kept("weight", 0))
    slice_attr(m, "weight", 1, ctx.param_kept("weight", 1))
    if m.bias is not None:
        slice_attr(m, "bias", 0, ctx.param_kept("bias", 0))
    m.out_features, m.in_features = m.weight.shape


LINEAR = _register(
    OpRule("linear", _couple_linear, _slim_linear, lambda c: _numel(c.inp(0)) * c.out[-1], "layer"),
    modules=(nn.Linear,),
)


def _couple_channel_norm(ctx: Ctx) -> None:
    """BatchNorm / InstanceNorm: per-channel on dim 1."""
    m = ctx.module
    x = ctx.node.args[0]
    nd = len(ctx.out_shape)
    sp = ctx.dim_map(x, {d: d for d in range(nd)})
    out = sp.get(1)
    if out is None:
        out = ctx.new(1)
        ctx.b.pin(out)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, attr, None) is not None:
            ctx.b.union(out, ctx.param(attr, 0, primary=attr in ("weight", "bias")))
    sp[1] = out
    ctx.set(TensorSpaces(tuple(sp.values())))


def _slim_channel_norm(ctx: SlimCtx) -> None:
    m = ctx.module
    n = None
    for attr in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, attr, None) is not None:
            slice_attr(m, attr, 0, ctx.param_kept(attr, 0))
            n = getattr(m, attr).shape[0]
    if n is None:
        n = ctx.new_shape(ctx.node)[1]
    m.num_features = n


def _flops_bn(ctx: FlopCtx) -> int:
    m = ctx.module
    n = _numel(ctx.inp(0))
    if m.training or not m.track_running_stats:
        return n * (5 if m.affine else 4)
    return n * (2 if m.affine else 1)


BATCHNORM = _register(
    OpRule("batch_norm", _couple_channel_norm, _slim_channel_norm, _flops_bn, "layer"),
    modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
)
INSTANCENORM = _register(
    OpRule("instance_norm", _couple_channel_norm, _slim_channel_norm,
           lambda c: _numel(c.inp(0)) * (5 if c.module.affine else 4), "smooth"),
    modules=(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
)


def _couple_group_norm(ctx: Ctx) -> None:
    m = ctx.module
    x = ctx.node.args[0]
    nd = len(ctx.out_shape)
    sp = ctx.dim_map(x, {d: d for d in range(nd)})
    out = sp.get(1) or ctx.new(1)
    if 1 not in sp:
        ctx.b.pin(out)
    sp[1] = out
    cpg = m.num_channels // m.num_groups
    for k in range(m.num_groups):
        ctx.b.union_many(out.elements(np.arange(k * cpg, (k + 1) * cpg)))
    if m.affine:
        ctx.b.union(out, ctx.param("weight", 0))
        ctx.b.union(out, ctx.param("bias", 0))
    ctx.set(TensorSpaces(tuple(sp.values())))


def _slim_group_norm(ctx: SlimCtx) -> None:
    m = ctx.module
    cpg = m.num_channels // m.num_groups
    n = ctx.new_shape(ctx.node)[1]
    if m.affine:
        slice_attr(m, "weight", 0, ctx.param_kept("weight", 0))
        slice_attr(m, "bias", 0, ctx.param_kept("bias", 0))
    m.num_channels, m.num_groups = n, n // cpg


GROUPNORM = _register(
    OpRule("group_norm", _couple_group_norm, _slim_group_norm,
           lambda c: _numel(c.inp(0)) * (5 if c.module.affine else 4), "smooth"),
    modules=(nn.GroupNorm,),
)

LAYERNORM = _register(
    OpRule("layer_norm", couple_last_dims_mixed(lambda c: len(c.module.normalized_shape)), None,
           lambda c: _numel(c.inp(0)) * (5 if c.module.elementwise_affine else 4), "smooth"),
    modules=(nn.LayerNorm,),
)
F_LAYERNORM = _register(
    OpRule("layer_norm", couple_last_dims_mixed(lambda c: len(c.arg(1, "normalized_shape"))), None,
           lambda c: _numel(c.inp(0)) * (5 if _arg(c.node, 2, "weight") is not None else 4), "smooth"),
    functions=(F.layer_norm,),
)
RMSNORM = _register(
    OpRule("rms_norm", couple_last_dims_mixed(lambda c: len(c.module.normalized_shape)), None, None, "smooth"),
    modules=(nn.RMSNorm,) if hasattr(nn, "RMSNorm") else (),
)


def _couple_embedding(ctx: Ctx) -> None:
    nd = len(ctx.out_shape)
    out = ctx.new(nd - 1)
    ctx.b.union(out, ctx.param("weight", 1))
    for a in _tensor_args(ctx.node):
        ctx.b.pin_all(_spaces(a))
    ctx.set(TensorSpaces((out,)))


def _slim_embedding(ctx: SlimCtx) -> None:
    m = ctx.module
    slice_attr(m, "weight", 1, ctx.param_kept("weight", 1))
    m.embedding_dim = m.weight.shape[1]


EMBEDDING = _register(OpRule("embedding", _couple_embedding, _slim_embedding, None, "layer"),
                      modules=(nn.Embedding,))


def _couple_prelu(ctx: Ctx) -> None:
    m = ctx.module
    couple_broadcast(ctx, [ctx.node.args[0]])
    if m.num_parameters > 1:
        out = ctx.node.meta[M.SPACES].at(1)
        w = ctx.param("weight", 0)
        if out is None:
            ctx.b.pin(w)
        else:
            ctx.b.union(out, w)


def _slim_prelu(ctx: SlimCtx) -> None:
    m = ctx.module
    if m.num_parameters > 1:
        slice_attr(m, "weight", 0, ctx.param_kept("weight", 0))
        m.num_parameters = m.weight.shape[0]


PRELU = _register(OpRule("prelu", _couple_prelu, _slim_prelu, None, "piecewise"), modules=(nn.PReLU,))


# ============================================================================ elementwise
_PIECEWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold)
_SMOOTH_MODULES = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
                   nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)

UNARY_PIECEWISE = _register(
    OpRule("relu_like", couple_broadcast, None, None, "piecewise"),
    modules=_PIECEWISE_MODULES,
    functions=(torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, torch.relu_, F.relu_, torch.abs,
               torch.clamp, torch.clip, F.threshold),
    methods=("relu", "relu_", "abs", "clamp", "clamp_", "clip", "clamp_min", "clamp_max"),
)
UNARY_SMOOTH = _register(
    OpRule("smooth_unary", couple_broadcast, None, None, "smooth"),
    modules=_SMOOTH_MODULES,
    functions=(F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
               F.elu, F.selu, F.celu, F.mish, F.softplus, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
               torch.square, torch.erf, torch.sin, torch.cos, F.logsigmoid, torch.reciprocal),
    methods=("sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "square", "erf",
             "reciprocal", "pow"),
)
IDENTITY = _register(
    OpRule("identity", couple_broadcast, None, None, "linear"),
    modules=_IDENTITY_MODULES,
    functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.neg, operator.neg,
               operator.pos, torch.clone, torch.Tensor.contiguous),
    methods=("contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "neg",
             "requires_grad_", "cpu", "cuda"),
)
try:  # torchvision wraps it as an opaque call: identity in eval, a per-sample scale in training
    from torchvision.ops.stochastic_depth import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover
    _stochastic_depth = None
STOCHASTIC_DEPTH = _register(
    OpRule("stochastic_depth", lambda c: couple_broadcast(c, [c.node.args[0]]), None, None, "linear"),
    functions=(_stochastic_depth,) if _stochastic_depth else (),
)
ADD_LIKE = _register(
    OpRule("add", couple_broadcast, None, None, "linear"),
    functions=(operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
               torch.subtract),
    methods=("add", "add_", "sub", "sub_"),
)
MUL_LIKE = _register(
    OpRule("mul", couple_broadcast, None, None, "bilinear"),
    functions=(operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div,
               torch.multiply, torch.true_divide, torch.maximum, torch.minimum, torch.where),
    methods=("mul", "mul_", "div", "div_", "maximum", "minimum", "expand_as"),
)


# ============================================================================ pooling, resampling
def _adaptive_pool_flops(c: FlopCtx) -> int:
    return _numel(c.inp(0)) if len(c.inp(0)) == 4 else 0


def _upsample_flops(c: FlopCtx) -> int:
    mode = getattr(c.module, "mode", None) if c.node.op == "call_module" else _arg(c.node, 3, "mode", "nearest")
    if len(c.out) != 4:
        return 0
    return _numel(c.out) * (4 if mode == "bilinear" else 1 if mode == "nearest" else 0)


POOL = _register(
    OpRule("pool", couple_spatial, None, None, "piecewise"),
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
             nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
             nn.ReplicationPad1d, nn.ReplicationPad2d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool3d),
)
ADAPTIVE_AVG_POOL2D = _register(
    OpRule("adaptive_avg_pool2d", couple_spatial, None, _adaptive_pool_flops, "linear"),
    modules=(nn.AdaptiveAvgPool2d,),
    functions=(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d),
)
UPSAMPLE = _register(
    OpRule("upsample", couple_spatial, None, _upsample_flops, "linear"),
    modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    functions=(F.interpolate, F.upsample),
)
REDUCE = _register(
    OpRule("reduce", couple_reduce, None, None, "linear"),
    functions=(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp),
    methods=("mean", "sum", "amax", "amin", "std", "var", "logsumexp"),
)
SOFTMAX = _register(
    OpRule("softmax", couple_pin_dim((1, "dim")), None, None, "smooth"),
    functions=(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize),
    methods=("softmax", "log_softmax"),
)
SOFTMAX_MODULE = _register(
    OpRule("softmax", couple_pin_dim((0, "dim"), from_module="dim"), None, None, "smooth"),
    modules=(nn.Softmax, nn.LogSoftmax, nn.Softmin),
)


# ============================================================================ shape ops
def _couple_flatten(ctx: Ctx) -> None:
    couple_reshape(ctx, _tensor_args(ctx.node)[0])


FLATTEN = _register(
    OpRule("flatten", _couple_flatten), modules=(nn.Flatten,), functions=(torch.flatten,),
    methods=("flatten",),
)
RESHAPE = _register(
    OpRule("reshape", lambda c: couple_reshape(c), slim_sizes(1, None)),
    functions=(torch.reshape,), methods=("view", "reshape"),
)


def _couple_permute(ctx: Ctx) -> None:
    node = ctx.node
    nd = len(ctx.out_shape)
    tgt = node.target
    if tgt in ("permute", torch.permute):
        p = _size_args(node, 1)[0] if tgt == "permute" else list(ctx.arg(1, "dims"))
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


PERMUTE = _register(
    OpRule("permute", _couple_permute),
    functions=(torch.permute, torch.transpose, torch.swapaxes, torch.movedim),
    methods=("permute", "transpose", "swapaxes", "t", "movedim"),
)


def _couple_unsqueeze(ctx: Ctx) -> None:
    ish, osh = _shape(ctx.node.args[0]), ctx.out_shape
    if ctx.node.target in ("unsqueeze", torch.unsqueeze):
        d = ctx.arg(1, "dim") % len(osh)
        m = {i: (i if i < d else i + 1) for i in range(len(ish))}
    else:  # squeeze
        dim = ctx.arg(1, "dim")
        dims = set(range(len(ish))) if dim is None else set(_norm_dims(dim, len(ish)))
        dropped = {i for i in dims if ish[i] == 1}
        m, j = {}, 0
        for i in range(len(ish)):
            if i in dropped:
                m[i] = None
            else:
                m[i] = j
                j += 1
    ctx.set(TensorSpaces(tuple(ctx.dim_map(ctx.node.args[0], m).values())))


UNSQUEEZE = _register(OpRule("unsqueeze", _couple_unsqueeze),
                      functions=(torch.unsqueeze, torch.squeeze), methods=("unsqueeze", "squeeze"))


def _couple_expand(ctx: Ctx) -> None:
    ish, osh = _shape(ctx.node.args[0]), ctx.out_shape
    off = len(osh) - len(ish)
    ctx.set(TensorSpaces(tuple(ctx.dim_map(
        ctx.node.args[0], {i: (i + off if ish[i] == osh[i + off] else None) for i in range(len(ish))}).values())))


EXPAND = _register(OpRule("expand", _couple_expand, slim_sizes(1, lambda c, d: -1)), methods=("expand",))


def _couple_cat(ctx: Ctx) -> None:
    tensors = list(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces: list[Space] = []
    # the concatenated dim
    if any(_ts(t).at(d) is not None for t in tensors):
        o = ctx.new(d)
        off = 0
        for t in tensors:
            n = _shape(t)[d]
            s = _ts(t).at(d)
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
    tied = [_ts(t).at(in_dim) for t in tensors]
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


CAT = _register(OpRule("cat", _couple_cat), functions=(torch.cat, torch.concat, torch.concatenate))


def _couple_stack(ctx: Ctx) -> None:
    tensors = list(ctx.arg(0, "tensors"))
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    spaces = [o for idim in range(nd - 1) for o in _tie_inputs(ctx, tensors, idim, idim if idim < d else idim + 1)]
    ctx.set(TensorSpaces(tuple(spaces)))


STACK = _register(OpRule("stack", _couple_stack), functions=(torch.stack,))


def _split_dim(ctx) -> int:
    nd = len(_shape(ctx.node.args[0]))
    return ctx.arg(2, "dim", 0) % nd


def _couple_split(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    tms = ctx.node.meta.get(M.TENSOR_META)
    d = _split_dim(ctx)
    s = _ts(x).at(d)
    nd = len(_shape(x))
    outs = []
    off = 0
    for k, tm in enumerate(tms):
        sh = tuple(tm.shape)
        spaces = []
        for xs in _ts(x).spaces:
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
    if _ts(x).at(d) is None:
        return
    sizes = []
    for k, tm in enumerate(node.meta[M.TENSOR_META]):
        o = node.meta[M.SPACES][k].at(d)
        sizes.append(int(ctx.kept(o).size))
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (x, sizes), {"dim": d}


SPLIT = _register(OpRule("split", _couple_split, _slim_split),
                  functions=(torch.split, torch.chunk, torch.tensor_split), methods=("split", "chunk"))


def _couple_pad(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    pad = list(ctx.arg(1, "pad"))
    ish = _shape(x)
    nd = len(ish)
    amounts = {nd - 1 - k // 2: (pad[k], pad[k + 1]) for k in range(0, len(pad), 2)}
    spaces = []
    for d in range(nd):
        s = _ts(x).at(d)
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
    pad = list(_arg(node, 1, "pad"))
    nd = len(_shape(x))
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


PAD = _register(OpRule("pad", _couple_pad, _slim_pad), functions=(F.pad,))


def _couple_roll(ctx: Ctx) -> None:
    x = ctx.node.args[0]
    nd = len(_shape(x))
    dims = ctx.arg(2, "dims")
    if dims is None:
        return ctx.barrier("roll without dims mixes every dimension")
    rolled = set(_norm_dims(dims, nd))
    ctx.set(TensorSpaces(tuple(ctx.dim_map(x, {d: (None if d in rolled else d) for d in range(nd)}).values())))


ROLL = _register(OpRule("roll", _couple_roll), functions=(torch.roll,), methods=("roll",))


def _couple_matmul(ctx: Ctx) -> None:
    a, b = ctx.node.args[0], ctx.node.args[1]
    sa, sb, so = _shape(a), _shape(b), ctx.out_shape
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return ctx.barrier("matmul with a 1-D or non-tensor operand")
    ka, kb = _ts(a).at(len(sa) - 1), _ts(b).at(len(sb) - 2)
    if ka is not None and kb is not None:
        ctx.b.union(ka, kb)
    else:
        ctx.b.pin(ka)
        ctx.b.pin(kb)
    spaces = []
    nd = len(so)
    ra, rb = _ts(a).at(len(sa) - 2), _ts(b).at(len(sb) - 1)
    for src, od in ((ra, nd - 2), (rb, nd - 1)):
        if src is not None:
            o = ctx.new(od)
            ctx.b.union(src, o)
            spaces.append(o)
    for d in range(nd - 2):  # batch dims broadcast
        tied, blocked = [], False
        for x, sx in ((a, sa), (b, sb)):
            xd = d - (nd - len(sx))
            if xd < 0:
                continue
            s = _ts(x).at(xd)
            if sx[xd] != so[d]:
                ctx.b.pin(s)
            elif s is None:
                blocked = blocked or so[d] > 1
            else:
                tied.append(s)
        if tied and blocked:
            for s in tied:
                ctx.b.pin(s)
        elif tied:
            o = ctx.new(d)
            for s in tied:
                ctx.b.union(s, o)
            spaces.append(o)
    ctx.set(TensorSpaces(tuple(spaces)))


def _matmul_flops(c: FlopCtx) -> int:
    sa, sb = c.shape(c.node.args[0]), c.shape(c.node.args[1])
    return _numel(c.out) * sa[-1]


MATMUL = _register(OpRule("matmul", _couple_matmul, None, _matmul_flops, "bilinear"),
                   functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"))


# ---- getitem --------------------------------------------------------------------------
def _couple_getitem(ctx: Ctx) -> None:
    src, idx = ctx.node.args
    v = _spaces(src)
    if isinstance(v, tuple):  # element of a split / chunk result
        ctx.set(v[idx] if isinstance(idx, int) else EMPTY)
        if not isinstance(idx, int):
            ctx.b.pin_all(v)
        return
    if not isinstance(v, TensorSpaces) or _shape(src) is None:
        return ctx.set(EMPTY if ctx.out_shape is not None else None)
    idx = idx if isinstance(idx, tuple) else (idx,)
    ish = _shape(src)
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
        else:
            return ctx.barrier("indexing with a tensor or list on a tensor")
    ctx.set(TensorSpaces(tuple(spaces)))


def _slim_getitem(ctx: SlimCtx) -> None:
    src, idx = ctx.node.args
    v = _spaces(src)
    if not isinstance(v, TensorSpaces) or not v.spaces:
        return
    was_tuple = isinstance(idx, tuple)
    idx = list(idx) if was_tuple else [idx]
    ish = _shape(src)
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


GETITEM = _register(OpRule("getitem", _couple_getitem, _slim_getitem), functions=(operator.getitem,))


# ============================================================================ size values
SIZE_FUNCTIONS = {getattr}
SIZE_METHODS = {"size", "dim", "numel", "ndimension"}
INT_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
             operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}
SIZE_CONSUMERS = {"view", "reshape", "expand", torch.reshape}


def _is_tensor(node: Any) -> bool:
    return _shape(node) is not None


def _size_node(ctx: Ctx) -> bool:
    """Handle x.shape / x.size() / x.size(d): record which channel spaces the value reveals."""
    node, st = ctx.node, ctx.state
    if node.op == "call_function" and node.target is getattr and _is_tensor(node.args[0]):
        if node.args[1] == "shape":
            st.size_vec[node.name] = tuple(
                frozenset([s.id]) if (s := _ts(node.args[0]).at(d)) else frozenset()
                for d in range(len(_shape(node.args[0]))))
        return True
    if node.op == "call_method" and node.target in SIZE_METHODS and _is_tensor(node.args[0]):
        x = node.args[0]
        if node.target == "size":
            dim = ctx.arg(1, "dim")
            if dim is None:
                st.size_vec[node.name] = tuple(
                    frozenset([s.id]) if (s := _ts(x).at(d)) else frozenset() for d in range(len(_shape(x))))
            else:
                s = _ts(x).at(dim % len(_shape(x)))
                st.taint[node.name] = frozenset([s.id]) if s else frozenset()
        elif node.target == "numel":
            st.taint[node.name] = frozenset(s.id for s in _ts(x).spaces)
        return True
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is not None \
            and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in st.size_vec:
        vec, i = st.size_vec[node.args[0].name], node.args[1]
        if isinstance(i, int):
            st.taint[node.name] = vec[i]
        elif isinstance(i, slice):
            st.size_vec[node.name] = vec[i]
        return True
    if node.op == "call_function" and node.target in INT_ARITH and not _is_tensor(node):
        st.taint[node.name] = frozenset().union(*(_taint_of(st, a) for a in node.args))
        return True
    return False


def _taint_of(st: _State, a: Any) -> frozenset[int]:
    if isinstance(a, torch.fx.Node):
        if a.name in st.size_vec:
            return frozenset().union(*st.size_vec[a.name]) if st.size_vec[a.name] else frozenset()
        return st.taint.get(a.name, frozenset())
    if isinstance(a, (tuple, list)):
        return frozenset().union(*(_taint_of(st, x) for x in a)) if a else frozenset()
    if isinstance(a, dict):
        return _taint_of(st, list(a.values()))
    return frozenset()


def _check_taint(ctx: Ctx) -> None:
    """A channel count read from a shape may only size the spaced dims of view/reshape/expand
    (which slimming rewrites). Anywhere else it would silently keep the old count: pin."""
    node, st = ctx.node, ctx.state
    t = node.target
    if t in SIZE_CONSUMERS and _is_tensor(node):
        start = 1
        sizes, _ = _size_args(node, start)
        spaced = set(_ts(node).dims)
        bad = frozenset()
        for d, a in enumerate(sizes):
            if d not in spaced:
                bad |= _taint_of(st, a)
        bad |= _taint_of(st, node.args[:start])
    else:
        bad = _taint_of(st, node.args) | _taint_of(st, node.kwargs)
    for sid in bad:
        ctx.b.pin(ctx.b.spaces[sid])


# ============================================================================ driver
def apply_rule(gm: torch.fx.GraphModule, node: torch.fx.Node, b: Builder, state: _State) -> None:
    """Run the coupling rule of one node (called by :func:`oba_fx.coupling.analyze`)."""
    ctx = Ctx(gm, node, b, state)
    if node.op == "placeholder":
        node.meta[M.SPACES] = EMPTY if _is_tensor(node) else None
        return
    if node.op == "get_attr":
        sh = _shape(node)
        if sh is None:
            node.meta[M.SPACES] = None
            return
        node.meta[M.SPACES] = TensorSpaces(tuple(
            b.param_space(node.target, d, n, primary=False) for d, n in enumerate(sh)))
        return
    if node.op == "output":
        b.pin_all([_spaces(a) for a in _tensor_args(node)])
        _check_taint(ctx)
        return
    if _size_node(ctx):
        node.meta[M.SPACES] = None
        return
    rule = rule_for_node(gm, node)
    if not _tensor_args(node) and node.meta.get(M.TENSOR_META) is None:
        _check_taint(ctx)  # plain Python values (or None picked from a tuple)
        node.meta[M.SPACES] = None
        return
    if rule is None:
        what = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else _fn_name(node.target)
        barrier(node, b, f"no rule for {node.op} {what}")
        _check_taint(ctx)
        return
    if node.meta.get(M.TENSOR_META) is None:
        barrier(node, b, f"{rule.name}: no shape information (did shape propagation run?)")
        return
    try:
        rule.couple(ctx)
    except Exception as e:  # a rule that cannot understand this use of its op: never guess
        barrier(node, b, f"{rule.name}: unsupported use ({type(e).__name__}: {e})")
    _check_taint(ctx)


def _fn_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


def count_flops(gm: torch.fx.GraphModule, shape_fn: Callable[[Any], tuple] | None = None) -> int:
    """FLOPs of a shape-propagated graph (fvcore convention), optionally with other shapes."""
    shape_fn = shape_fn or _shape
    total = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        rule = rule_for_node(gm, node)
        if rule is None or rule.flops is None or _shape(node) is None:
            if rule is None and node.op == "call_module":
                total += _leaf_module_flops(gm, node, shape_fn)
            elif rule is None and node.op == "call_function":
                total += _barrier_function_flops(node, shape_fn)
            continue
        total += int(rule.flops(FlopCtx(gm, node, shape_fn)))
    return total


try:  # a torch.fx-wrapped function: one opaque call holding Swin's qkv / output projections
    from torchvision.models.swin_transformer import shifted_window_attention as _shifted_window_attention
except ImportError:  # pragma: no cover
    _shifted_window_attention = None


def _barrier_function_flops(node, shape_fn) -> int:
    """FLOPs of a function without a rule (a barrier) that does the work of layers, as fvcore
    counts it:

    * torchvision's ``shifted_window_attention`` (Swin): over the tokens of the input padded to
      whole windows, ``T = B * pad_H * pad_W``, the qkv and output projections ``T * C * 4C`` plus
      the two attention matmuls ``2 * T * N * C`` (``N`` tokens per window);
    * a two-operand contracting ``torch.einsum`` (MaxViT's attention): the product of the sizes of
      all its indices.
    """
    if _shifted_window_attention is not None and node.target is _shifted_window_attention:
        x, ws = shape_fn(node.args[0]), _arg(node, 4, "window_size")
        if x is None or ws is None or len(x) != 4:
            return 0
        b, h, w, c = x
        t = b * -(-h // ws[0]) * ws[0] * -(-w // ws[1]) * ws[1]
        return t * c * 4 * c + 2 * t * ws[0] * ws[1] * c
    if node.target is torch.einsum and node.args and isinstance(node.args[0], str):
        eq = node.args[0].replace(" ", "")
        ops = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
        if "->" not in eq or "." in eq or len(ops) != 2:
            return 0
        ins, out = eq.split("->")
        terms = ins.split(",")
        size: dict[str, int] = {}
        for term, a in zip(terms, ops):
            sh = shape_fn(a)
            if sh is None or len(sh) != len(term):
                return 0
            size.update(zip(term, sh))
        if not set(size) - set(out):  # nothing summed: not a contraction
            return 0
        return math.prod(size.values())
    return 0


def _leaf_module_flops(gm, node, shape_fn) -> int:
    """FLOPs of a leaf module without a rule (it keeps its shape): attention's matmuls."""
    m = gm.get_submodule(node.target)
    if isinstance(m, nn.MultiheadAttention):
        q = _shape(node.args[0])
        if q is None:
            return 0
        k = _shape(node.args[1]) if len(node.args) > 1 and _shape(node.args[1]) else q
        e = m.embed_dim
        nq = math.prod(q[:-1])
        nk = math.prod(k[:-1])
        seq_q = q[0] if not m.batch_first else q[1]
        seq_k = k[0] if not m.batch_first else k[1]
        batch = nq // seq_q
        return nq * e * e + 2 * nk * e * e + 2 * batch * seq_q * seq_k * e + nq * e * e
    return 0


def slim_node(gm: torch.fx.GraphModule, node: torch.fx.Node, coupling, removed: np.ndarray) -> None:
    """Apply the slim rule of ``node`` (module replacement or constant rewrite)."""
    rule = rule_for_node(gm, node)
    if rule is not None and rule.slim is not None:
        rule.slim(SlimCtx(gm, node, coupling, removed))
