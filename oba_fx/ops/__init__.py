"""The one op table: how each supported op couples channels, is slimmed, counts FLOPs, and
which second-derivative class it belongs to.

Each op is declared once, as an :class:`OpRule`, and registered for the module types,
functions and tensor-method names that mean it. An op that is not in the table is a
*barrier*: every space it touches is pinned, and the report lists it. Nothing is guessed.

FLOPs follow fvcore's convention (one multiply-add = one FLOP; convolutions, linear maps,
matmuls, norms, adaptive average pooling and upsampling are counted; elementwise ops are not),
for the batch size of the example inputs.

Each rule's second-derivative class is a :class:`Curvature` (used by the Hessian-structure
analysis). A user adds a rule for their own layer or function with :func:`register` (see
``docs/design.md`` "Adding an op rule" and the README's example).

Example:
    >>> rule_for_module(torch.nn.Conv2d(3, 8, 3)).name
    'conv'
    >>> rule_for_function(torch.cat).name
    'cat'
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the examples above)

from . import attention, elementwise, layers, shapes  # noqa: F401  (importing registers the rules)
from .base import (FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Ctx, Curvature, FlopCtx, OpRule, SlimCtx, new_shape,
                   node_arg, numel, register, rule_for_function, rule_for_module, rule_for_node, shape_of, slice_attr,
                   spaces_of, tensor_args, tensor_spaces)
from .driver import apply_rule, count_flops, slim_node
from .generic import reshape_groups
from .sizes import is_size_value

__all__ = ["OpRule", "Curvature", "register", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "rule_for_module",
           "rule_for_function", "rule_for_node", "Ctx", "SlimCtx", "FlopCtx", "new_shape", "slice_attr", "apply_rule",
           "count_flops", "slim_node", "reshape_groups", "shape_of", "spaces_of", "tensor_spaces", "tensor_args",
           "node_arg", "numel", "is_size_value"]
