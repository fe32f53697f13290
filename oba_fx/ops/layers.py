"""Parameterised layers: convolutions, linear maps, norms, embedding, PReLU."""

from __future__ import annotations

import math

from typing import Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import meta as M
from ..spaces import TensorSpaces
from .base import Curvature, Ctx, FlopCtx, OpRule, SlimCtx, node_arg, numel, register, spaces_of, tensor_args, tensor_spaces, slice_attr
from .base import shape_of
from .generic import couple_broadcast, couple_last_dims_mixed, mark_primary, tie_or_pin


# ============================================================================ layers
def _conv_spaces(ctx: Ctx, transposed: bool) -> None:
    """Conv: weight (out, in/g, k..) or, transposed, (in, out/g, k..).

    groups == 1: out channel i <-> weight row i <-> bias i; input channel j <-> weight column j.
    groups > 1 (depthwise included): a whole group (its input block, output block, weight rows
    and bias entries) is one unit, so slimming removes groups and rewrites ``groups``.
    """
    m = ctx.module
    g = m.groups
    xs = tensor_spaces(ctx.node.args[0]).at(1)
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
    # one row per group: its output block, weight rows and (when known) input block
    blocks = [out.elements().reshape(g, opg), w_rows.elements().reshape(g, rpg)]
    if xs is not None:
        blocks.append(xs.elements().reshape(g, ipg))
    ctx.b.union_rows(np.concatenate(blocks, axis=1))
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


CONV = register(
    OpRule("conv", lambda c: _conv_spaces(c, False), lambda c: _slim_conv(c, False),
           lambda c: _flops_conv(c, False), "layer"),
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
)
CONV_T = register(
    OpRule("conv_transpose", lambda c: _conv_spaces(c, True), lambda c: _slim_conv(c, True),
           lambda c: _flops_conv(c, True), "layer"),
    modules=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
)


def _couple_linear(ctx: Ctx) -> None:
    m = ctx.module
    x = ctx.node.args[0]
    nd = len(ctx.out_shape)
    carried = ctx.dim_map(x, {d: d for d in range(nd - 1)}, consumed=(nd - 1,))
    xs = tensor_spaces(x).at(nd - 1)
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


LINEAR = register(
    OpRule("linear", _couple_linear, _slim_linear, lambda c: numel(c.inp(0)) * c.out[-1], "layer"),
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
    n = numel(ctx.inp(0))
    if m.training or not m.track_running_stats:
        return n * (5 if m.affine else 4)
    return n * (2 if m.affine else 1)


def _bn_curvature(m: nn.Module) -> Curvature:
    """With batch statistics (train mode, or no running statistics) BatchNorm is smooth in its input."""
    return Curvature.SMOOTH_LAYER if (m.training or not m.track_running_stats) else Curvature.LAYER


BATCHNORM = register(
    OpRule("batch_norm", _couple_channel_norm, _slim_channel_norm, _flops_bn, Curvature.LAYER,
           curvature_of=_bn_curvature),
    modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
)
INSTANCENORM = register(
    OpRule("instance_norm", _couple_channel_norm, _slim_channel_norm,
           lambda c: numel(c.inp(0)) * (5 if c.module.affine else 4), "smooth"),
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
    ctx.b.union_rows(out.elements()[: m.num_groups * cpg].reshape(m.num_groups, cpg))
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


GROUPNORM = register(
    OpRule("group_norm", _couple_group_norm, _slim_group_norm,
           lambda c: numel(c.inp(0)) * (5 if c.module.affine else 4), "smooth"),
    modules=(nn.GroupNorm,),
)

def _couple_norm(k_of: Callable[[Ctx], int]) -> Callable[[Ctx], None]:
    """LayerNorm / RMSNorm: statistics over the last ``k`` dims, which are pinned; with the
    ``norm_width`` analysis option and ``k == 1`` the normalised channels are coupled instead
    (input, output, weight and bias), and removing one renormalises over the kept ones."""
    mixed = couple_last_dims_mixed(k_of)

    def couple(ctx: Ctx) -> None:
        if not ctx.state.norm_width or k_of(ctx) != 1:
            return mixed(ctx)
        x = tensor_args(ctx.node)[0]
        nd = len(ctx.out_shape)
        sp = ctx.dim_map(x, {d: d for d in range(nd)})
        out = sp.get(nd - 1)
        if out is None:
            out = ctx.new(nd - 1)
            ctx.b.pin(out)
            sp[nd - 1] = out
        for attr, dim in _norm_affine(ctx):
            if isinstance(attr, str):
                ctx.b.union(out, ctx.param(attr, dim, primary=True))
            elif (s := tensor_spaces(attr).at(0)) is not None:
                ctx.b.union(out, s)
            else:
                ctx.b.pin(out)
        ctx.set(TensorSpaces(tuple(sp.values())))

    return couple


def _norm_affine(ctx: Ctx) -> list:
    """The affine tensors of a norm: attribute names (module) or nodes (functional)."""
    if ctx.node.op == "call_module":
        return [(a, 0) for a in ("weight", "bias") if getattr(ctx.module, a, None) is not None]
    return [(a, 0) for a in (ctx.arg(2, "weight"), ctx.arg(3, "bias")) if isinstance(a, torch.fx.Node)]


def _slim_norm_module(ctx: SlimCtx) -> None:
    m = ctx.module
    for attr in ("weight", "bias"):
        if getattr(m, attr, None) is not None:
            slice_attr(m, attr, 0, ctx.param_kept(attr, 0))
    new = ctx.new_shape(ctx.node)
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(new[len(new) - k:])


def _slim_norm_function(ctx: SlimCtx) -> None:
    node = ctx.node
    new = ctx.new_shape(node)
    k = len(ctx.arg(1, "normalized_shape"))
    shape = tuple(new[len(new) - k:])
    if len(node.args) > 1:
        node.args = (node.args[0], shape) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": shape}


LAYERNORM = register(
    OpRule("layer_norm", _couple_norm(lambda c: len(c.module.normalized_shape)), _slim_norm_module,
           lambda c: numel(c.inp(0)) * (5 if c.module.elementwise_affine else 4), Curvature.SMOOTH,
           renormalises="layer"),
    modules=(nn.LayerNorm,),
)
F_LAYERNORM = register(
    OpRule("layer_norm", _couple_norm(lambda c: len(c.arg(1, "normalized_shape"))), _slim_norm_function,
           lambda c: numel(c.inp(0)) * (5 if node_arg(c.node, 2, "weight") is not None else 4), Curvature.SMOOTH,
           renormalises="layer"),
    functions=(F.layer_norm,),
)
RMSNORM = register(
    OpRule("rms_norm", _couple_norm(lambda c: len(c.module.normalized_shape)), _slim_norm_module, None,
           Curvature.SMOOTH, renormalises="rms"),
    modules=(nn.RMSNorm,) if hasattr(nn, "RMSNorm") else (),
)


def _couple_embedding(ctx: Ctx) -> None:
    nd = len(ctx.out_shape)
    out = ctx.new(nd - 1)
    ctx.b.union(out, ctx.param("weight", 1))
    for a in tensor_args(ctx.node):
        ctx.b.pin_all(spaces_of(a))
    ctx.set(TensorSpaces((out,)))


def _slim_embedding(ctx: SlimCtx) -> None:
    m = ctx.module
    slice_attr(m, "weight", 1, ctx.param_kept("weight", 1))
    m.embedding_dim = m.weight.shape[1]


EMBEDDING = register(OpRule("embedding", _couple_embedding, _slim_embedding, None, "layer"),
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


PRELU = register(OpRule("prelu", _couple_prelu, _slim_prelu, None, "piecewise"), modules=(nn.PReLU,))




# ============================================================================ functional layers
# ``F.conv2d(x, self.weight, self.bias)``, ``F.batch_norm(x, self.running_mean, ...)``: the layer's
# tensors are operands read with ``get_attr`` (timm's ``BatchNormAct2d``, hand-written blocks).
# The coupling ties the operands' spaces as the module rules tie the module's attributes;
# :func:`oba_fx.surgery.slim` slices every ``get_attr`` tensor along its removed indices, so a
# slim rule only rewrites integer arguments (``groups``, ``num_groups``).
def _channel_dim(x: torch.fx.Node, w_rank: int) -> int:
    """The channel dim of a convolution's input: 1 when batched, 0 when not."""
    return 1 if len(shape_of(x)) == w_rank else 0


def _couple_fconv(ctx: Ctx) -> None:
    """``F.conv{1,2,3}d(x, w, b, stride, padding, dilation, groups)``: out channel i <-> w row i
    <-> b entry i; input channel j <-> w column j (``groups == 1``), or one unit per group."""
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    g = ctx.arg(6, "groups", 1)
    sw, sx = shape_of(w), shape_of(x)
    if sw is None or sx is None or not isinstance(g, int) or len(sx) not in (len(sw), len(sw) - 1):
        return ctx.barrier("functional convolution with a non-tensor weight or a computed groups")
    cd = _channel_dim(x, len(sw))
    for s in tensor_spaces(x).spaces:  # batch and spatial dims are mixed by the kernel
        if s.dim != cd:
            ctx.b.pin(s)
    for s in tensor_spaces(w).spaces:
        if s.dim >= (2 if g == 1 else 1):  # kernel dims; in/g columns of a grouped conv
            ctx.b.pin(s)
    xs, w0 = tensor_spaces(x).at(cd), tensor_spaces(w).at(0)
    bs = [tensor_spaces(bias).at(0)] if isinstance(bias, torch.fx.Node) else []
    out = ctx.new(cd)
    if g == 1:
        tie_or_pin(ctx, xs, tensor_spaces(w).at(1))
        if tie_or_pin(ctx, out, w0, *bs) is None:
            ctx.b.pin(out)
    elif any(s is None for s in [w0] + bs):  # weight or bias rows that cannot be sliced
        for s in [xs, w0, out] + bs:
            ctx.b.pin(s)
    else:  # one unit per group: its output block, weight rows, bias entries and input block
        opg, ipg = sw[0] // g, sx[cd] // g
        els = [s.elements()[: g * opg].reshape(g, opg) for s in [out, w0] + bs]
        if xs is not None:
            els.append(xs.elements()[: g * ipg].reshape(g, ipg))
        ctx.b.union_rows(np.concatenate(els, axis=1))
        if xs is None:
            ctx.b.pin(out)
    mark_primary(ctx, w, 0)
    ctx.set(TensorSpaces((out,)))


def _slim_fconv(ctx: SlimCtx) -> None:
    """A grouped functional conv keeps ``w.shape[0] / (out channels per group)`` groups."""
    node = ctx.node
    g = ctx.arg(6, "groups", 1)
    if g == 1:
        return
    w = ctx.arg(1, "weight")
    opg = shape_of(w)[0] // g
    new_g = ctx.new_shape(node)[_channel_dim(ctx.arg(0, "input"), len(shape_of(w)))] // opg
    if len(node.args) > 6:
        node.args = node.args[:6] + (new_g,) + node.args[7:]
    else:
        node.kwargs = {**node.kwargs, "groups": new_g}


def _flops_fconv(c: FlopCtx) -> int:
    """Each output element is a dot product over ``w.shape[1:]`` (fvcore's count)."""
    return numel(c.out) * numel(c.shape(node_arg(c.node, 1, "weight"))[1:])


F_CONV = register(
    OpRule("conv", _couple_fconv, _slim_fconv, _flops_fconv, Curvature.BILINEAR),
    functions=(F.conv1d, F.conv2d, F.conv3d),
)


def _couple_fchannel_norm(per_channel: tuple[tuple[int, str], ...], primary: tuple[str, ...],
                          groups: tuple[int, str] | None = None) -> Callable[[Ctx], None]:
    """``F.batch_norm`` / ``F.instance_norm`` / ``F.group_norm``: statistics per channel (dim 1)
    or per group of channels; the per-channel operands (running statistics, weight, bias) are
    tied to the channel; with ``groups`` the channels of one group are one unit."""

    def couple(ctx: Ctx) -> None:
        x = ctx.arg(0, "input")
        nd = len(ctx.out_shape)
        if nd < 2:
            return ctx.barrier("channel norm over a tensor without a channel dim")
        sp = ctx.dim_map(x, {d: d for d in range(nd)})
        out = sp.get(1)
        if out is None:
            out = sp[1] = ctx.new(1)
            ctx.b.pin(out)
        if groups is not None:
            n_groups = ctx.arg(*groups)
            if not isinstance(n_groups, int):
                ctx.b.pin(out)
            else:
                cpg = out.size // n_groups
                ctx.b.union_rows(out.elements()[: n_groups * cpg].reshape(n_groups, cpg))
        for i, name in per_channel:
            a = ctx.arg(i, name)
            if isinstance(a, torch.fx.Node) and tie_or_pin(ctx, out, tensor_spaces(a).at(0)) is None:
                ctx.b.pin(out)
            if name in primary:
                mark_primary(ctx, a, 0)
        ctx.set(TensorSpaces(tuple(sp[d] for d in sorted(sp))))

    return couple


def _slim_fgroup_norm(ctx: SlimCtx) -> None:
    """``num_groups`` shrinks with the channels (whole groups are removed)."""
    node = ctx.node
    g = ctx.arg(1, "num_groups")
    cpg = shape_of(node)[1] // g
    new_g = ctx.new_shape(node)[1] // cpg
    if len(node.args) > 1:
        node.args = (node.args[0], new_g) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new_g}


def _fnorm_curvature(stats_arg: tuple[int, str], default: bool) -> Callable[[torch.fx.Node], Curvature]:
    """With running statistics held as buffers (``get_attr``) the norm is affine in its input
    (:attr:`Curvature.LAYER`); with batch/instance statistics it is also smooth in it."""

    def curvature(node: torch.fx.Node) -> Curvature:
        batch_stats = node_arg(node, *stats_arg, default)
        stats = [node_arg(node, 1, "running_mean"), node_arg(node, 2, "running_var")]
        if batch_stats is False and all(isinstance(s, torch.fx.Node) and s.op == "get_attr" for s in stats):
            return Curvature.LAYER
        return Curvature.SMOOTH_LAYER

    return curvature


def _flops_fnorm(stats_arg: tuple[int, str] | None, default: bool, weight_arg: tuple[int, str]):
    """fvcore's norm count: 5 (batch statistics) or 2 (running statistics) per element with an
    affine weight, one less without."""

    def flops(c: FlopCtx) -> int:
        batch_stats = True if stats_arg is None else node_arg(c.node, *stats_arg, default) is not False
        affine = node_arg(c.node, *weight_arg) is not None
        return numel(c.inp(0)) * ((4 if batch_stats else 1) + affine)

    return flops


F_BATCHNORM = register(
    OpRule("batch_norm", _couple_fchannel_norm(((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")),
                                               ("weight", "bias")),
           None, _flops_fnorm((5, "training"), False, (3, "weight")), Curvature.LAYER,
           curvature_of=_fnorm_curvature((5, "training"), False)),
    functions=(F.batch_norm,),
)
F_INSTANCENORM = register(
    OpRule("instance_norm", _couple_fchannel_norm(((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                   (4, "bias")), ("weight", "bias")),
           None, _flops_fnorm((5, "use_input_stats"), True, (3, "weight")), Curvature.SMOOTH_LAYER,
           curvature_of=_fnorm_curvature((5, "use_input_stats"), True)),
    functions=(F.instance_norm,),
)
F_GROUPNORM = register(
    OpRule("group_norm", _couple_fchannel_norm(((2, "weight"), (3, "bias")), ("weight", "bias"), groups=(1, "num_groups")),
           _slim_fgroup_norm, _flops_fnorm(None, True, (2, "weight")), Curvature.SMOOTH_LAYER),
    functions=(F.group_norm,),
)
