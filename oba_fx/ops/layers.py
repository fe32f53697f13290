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
from .generic import couple_broadcast, couple_last_dims_mixed


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


