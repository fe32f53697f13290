"""What the directly generated fused HVP program (:mod:`oba_fx.hvp_direct`) refuses, and the
nodes it copies as constants.

The generic rule differentiates any deterministic op exactly; it refuses (with
:class:`UnsupportedGraph`, naming the node) what is not one fixed function of its inputs, or what
would change the model: random ops, dropout and BatchNorm / InstanceNorm with batch statistics
(train mode: they update the running statistics), attention with dropout, and an in-place op on a
tensor that other nodes also read (made out-of-place it would change what they see).

Example:
    >>> import torch, torch.nn.functional as F
    >>> gm = torch.fx.symbolic_trace(lambda x: F.dropout(x, 0.5))
    >>> refuse_function(next(n for n in gm.graph.nodes if n.op == "call_function"))
    Traceback (most recent call last):
    ...
    oba_fx.hvp_direct_refuse.UnsupportedGraph: node dropout: dropout in train mode (random)
"""

from __future__ import annotations

import builtins
import copy
import inspect
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


class UnsupportedGraph(Exception):
    """The direct generator has no rule for a node (the message names it)."""


_RANDOM = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
           torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, F.gumbel_softmax}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "geometric_",
                   "cauchy_", "log_normal_", "multinomial"}
#: function -> (position, name, default) of its "training" flag
_TRAINING_FLAG = {F.dropout: (2, "training", True), F.dropout1d: (2, "training", True),
                  F.dropout2d: (2, "training", True), F.dropout3d: (2, "training", True),
                  F.alpha_dropout: (2, "training", False), F.feature_alpha_dropout: (2, "training", False),
                  torch.dropout: (2, "train", None), torch.alpha_dropout: (2, "train", None),
                  torch.feature_dropout: (2, "train", None), F.rrelu: (3, "training", False),
                  F.batch_norm: (5, "training", False), F.instance_norm: (5, "use_input_stats", True)}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse"}
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                     "is_contiguous", "element_size"}
_STATEFUL = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.RReLU)


def _arg(node: torch.fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def is_metadata(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape, dtype, device, ... (not its values)."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def refuse_function(node: torch.fx.Node) -> None:
    """Raise :class:`UnsupportedGraph` if the call_function / call_method ``node`` is random or
    uses batch statistics."""
    t = node.target
    if (node.op == "call_function" and t in _RANDOM) or (node.op == "call_method" and t in _RANDOM_METHODS):
        raise UnsupportedGraph(f"node {node.name}: {getattr(t, '__name__', t)} is random")
    if node.op != "call_function":
        return
    flag = _TRAINING_FLAG.get(t)
    if flag is not None and _arg(node, *flag) is not False:
        what = "BatchNorm / InstanceNorm with batch statistics" if t in (F.batch_norm, F.instance_norm) else \
            "dropout in train mode (random)"
        if t is F.instance_norm and _arg(node, 1, "running_mean", None) is None:
            return  # no running statistics: a plain deterministic normalisation
        raise UnsupportedGraph(f"node {node.name}: {what}")
    if t is F.scaled_dot_product_attention and _arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        raise UnsupportedGraph(f"node {node.name}: attention with dropout (random)")


def refuse_module(name: str, m: nn.Module) -> None:
    """Raise :class:`UnsupportedGraph` if the leaf module ``m`` (or a submodule) would draw random
    numbers or update running statistics (train-mode dropout / BatchNorm)."""
    for sub_name, sub in m.named_modules():
        if sub.training and isinstance(sub, _STATEFUL):
            if isinstance(sub, nn.modules.batchnorm._NormBase) and not sub.track_running_stats:
                continue
            where = f"{name}.{sub_name}" if sub_name else name
            raise UnsupportedGraph(f"module {where!r} ({type(sub).__name__}) in train mode")


def out_of_place(node: torch.fx.Node, op: Any) -> tuple[Any, tuple, dict]:
    """``(op, args, kwargs)`` of ``node`` computed out of place: an in-place method ``x.foo_()``
    becomes ``x.foo()``, ``inplace=True`` becomes ``False`` (a module's ``inplace`` flag on a
    shallow copy). Refused when the mutated tensor has other readers.

    Example:
        >>> gm = torch.fx.symbolic_trace(lambda x: x.sin().mul_(2))
        >>> node = [n for n in gm.graph.nodes if n.op == "call_method"][1]
        >>> out_of_place(node, node.target)[0]
        'mul'
    """
    args, kwargs = tuple(node.args), dict(node.kwargs)
    inplace = False
    if node.op == "call_method" and isinstance(op, str) and op.endswith("_") and not op.endswith("__"):
        if not hasattr(torch.Tensor, op[:-1]):
            raise UnsupportedGraph(f"node {node.name}: in-place {op} has no out-of-place form")
        op, inplace = op[:-1], True
    elif kwargs.get("inplace") is True:
        kwargs["inplace"], inplace = False, True
    elif isinstance(op, nn.Module) and getattr(op, "inplace", False) is True:
        op, inplace = copy.copy(op), True
        op.inplace = False
    elif callable(op) and not isinstance(op, nn.Module):
        pos = _inplace_position(op)
        if pos is not None and len(args) > pos and args[pos] is True:
            args, inplace = args[:pos] + (False,) + args[pos + 1:], True
    if inplace and args and isinstance(args[0], torch.fx.Node) and len(args[0].users) > 1:
        raise UnsupportedGraph(f"node {node.name}: in-place op on a tensor that other nodes read")
    return op, args, kwargs


def _inplace_position(fn: Callable) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


__all__ = ["UnsupportedGraph", "is_metadata", "refuse_function", "refuse_module", "out_of_place"]
