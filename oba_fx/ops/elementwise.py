"""Elementwise ops, activations, pooling, resampling, reductions and softmax."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import FlopCtx, OpRule, node_arg, numel, register, tensor_spaces
from .generic import couple_broadcast, couple_pin_dim, couple_reduce, couple_spatial


# ============================================================================ elementwise
_PIECEWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold)
_SMOOTH_MODULES = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
                   nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout)

UNARY_PIECEWISE = register(
    OpRule("relu_like", couple_broadcast, None, None, "piecewise"),
    modules=_PIECEWISE_MODULES,
    functions=(torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, torch.relu_, F.relu_, torch.abs,
               torch.clamp, torch.clip, F.threshold),
    methods=("relu", "relu_", "abs", "clamp", "clamp_", "clip", "clamp_min", "clamp_max"),
)
UNARY_SMOOTH = register(
    OpRule("smooth_unary", couple_broadcast, None, None, "smooth"),
    modules=_SMOOTH_MODULES,
    functions=(F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
               F.elu, F.selu, F.celu, F.mish, F.softplus, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
               torch.square, torch.erf, torch.sin, torch.cos, F.logsigmoid, torch.reciprocal),
    methods=("sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "square", "erf",
             "reciprocal", "pow"),
)
IDENTITY = register(
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
STOCHASTIC_DEPTH = register(
    OpRule("stochastic_depth", lambda c: couple_broadcast(c, [c.node.args[0]]), None, None, "linear"),
    functions=(_stochastic_depth,) if _stochastic_depth else (),
)
ADD_LIKE = register(
    OpRule("add", couple_broadcast, None, None, "linear", sums=True),
    functions=(operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
               torch.subtract),
    methods=("add", "add_", "sub", "sub_"),
)
MUL_LIKE = register(
    OpRule("mul", couple_broadcast, None, None, "bilinear"),
    functions=(operator.mul, operator.imul, torch.mul, torch.multiply, torch.maximum, torch.minimum, torch.where),
    methods=("mul", "mul_", "maximum", "minimum", "expand_as"),
)
ADDCMUL = register(  # input + value * t1 * t2 (or / t2): smooth is the safe superset of its blocks
    OpRule("addcmul", couple_broadcast, None, None, "smooth"),
    functions=(torch.addcmul, torch.addcdiv),
    methods=("addcmul", "addcdiv"),
)
DIV = register(
    OpRule("div", couple_broadcast, None, None, "quotient"),
    functions=(operator.truediv, operator.itruediv, torch.div, torch.true_divide),
    methods=("div", "div_"),
)


# ============================================================================ pooling, resampling
def _adaptive_pool_flops(c: FlopCtx) -> int:
    return numel(c.inp(0)) if len(c.inp(0)) == 4 else 0


def _upsample_flops(c: FlopCtx) -> int:
    mode = getattr(c.module, "mode", None) if c.node.op == "call_module" else node_arg(c.node, 3, "mode", "nearest")
    if len(c.out) != 4:
        return 0
    return numel(c.out) * (4 if mode == "bilinear" else 1 if mode == "nearest" else 0)


POOL = register(
    OpRule("pool", couple_spatial, None, None, "piecewise"),
    modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
             nn.AdaptiveAvgPool3d, nn.LPPool1d, nn.LPPool2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
             nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
             nn.ReplicationPad1d, nn.ReplicationPad2d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool3d),
)
ADAPTIVE_AVG_POOL2D = register(
    OpRule("adaptive_avg_pool2d", couple_spatial, None, _adaptive_pool_flops, "linear"),
    modules=(nn.AdaptiveAvgPool2d,),
    functions=(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d),
)
UPSAMPLE = register(
    OpRule("upsample", couple_spatial, None, _upsample_flops, "linear"),
    modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    functions=(F.interpolate, F.upsample),
)
REDUCE = register(
    OpRule("reduce", couple_reduce, None, None, "linear"),
    functions=(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp),
    methods=("mean", "sum", "amax", "amin", "std", "var", "logsumexp"),
)
_couple_softmax_dim = couple_pin_dim((1, "dim"))


def _couple_softmax(ctx) -> None:
    """Softmax mixes its dim; over the last dim of ``(..., heads, L, S)`` scores it is the
    softmax of a hand-written attention, whose head space is recorded for the report."""
    _couple_softmax_dim(ctx)
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim")
    if ctx.node.target is not F.normalize and nd >= 4 and isinstance(d, int) and d % nd == nd - 1:
        ctx.b.mark_heads(ctx.node, tensor_spaces(ctx.node).at(nd - 3))


SOFTMAX = register(
    OpRule("softmax", _couple_softmax, None, None, "smooth"),
    functions=(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize),
    methods=("softmax", "log_softmax"),
)
SOFTMAX_MODULE = register(
    OpRule("softmax", couple_pin_dim((0, "dim"), from_module="dim"), None, None, "smooth"),
    modules=(nn.Softmax, nn.LogSoftmax, nn.Softmin),
)


