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
    ``"attention"`` ``softmax(q kᵀ) v``: smooth in (q, k), linear in v, bilinear across.
    ``"none"``      does not carry tensors (size arithmetic).

Example:
    >>> rule_for_module(torch.nn.Conv2d(3, 8, 3)).name
    'conv'
    >>> rule_for_function(torch.cat).name
    'cat'
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the examples above)

from . import attention, elementwise, layers, shapes  # noqa: F401  (importing registers the rules)
from .base import (FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Ctx, FlopCtx, OpRule, SlimCtx, _shape,
                   _tensor_args, new_shape, rule_for_function, rule_for_module, rule_for_node, slice_attr)
from .driver import apply_rule, count_flops, slim_node
from .generic import reshape_groups

__all__ = ["OpRule", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "rule_for_module", "rule_for_function",
           "rule_for_node", "Ctx", "SlimCtx", "FlopCtx", "new_shape", "slice_attr", "apply_rule", "count_flops",
           "slim_node", "reshape_groups"]
