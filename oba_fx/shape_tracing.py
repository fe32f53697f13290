"""A tracer that knows the example inputs: sizes become Python ints, data stays symbolic.

``torch.fx.symbolic_trace`` cannot follow ``if x.shape[-1] > 4:`` because ``x.shape`` is a
Proxy. :class:`ShapeTracer` runs every traced op on the real example tensors alongside the
graph it records, so every node has a concrete value. Size queries (``x.shape``, ``x.size(1)``,
``x.dim()``, ``len(x)``, iteration over a tensor) return that value's Python ints instead of a
node: shape-driven control flow is resolved and the sizes are baked into the graph as
constants, so the graph is *specialised* to the example input shapes. Anything computed from
the tensors' *values* (``if x.sum() > 0:``) still cannot be resolved and raises
:class:`DataDependentError` naming the op that produced the tested value.

The concrete run has no side effects on the model: it runs without autograd, on the random
number generator's state of the moment (restored afterwards), and every parameter and buffer
is restored after tracing (a BatchNorm in training mode updates its running statistics).

Example:
    >>> import torch
    >>> class Half(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x[:, : x.size(1) // 2] if x.shape[-1] > 4 else x
    >>> graph = ShapeTracer((torch.randn(2, 6),)).trace(Half())
    >>> [n.target for n in graph.nodes if n.op == "call_function"]
    [<built-in function getitem>]
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.node import map_aggregate

from .tracing import LeafTracer
from .leaf_tracer import TracerProxy

#: tensor attributes answered with the example value instead of a node
META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse"})
#: tensor methods answered with the example value instead of a node
META_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "is_floating_point",
                          "is_complex", "is_contiguous"})
#: functions answered with the example value instead of a node
META_FUNCTIONS = (torch.numel, torch.is_floating_point, torch.is_complex, torch.Tensor.size,
                  torch.Tensor.dim)


class DataDependentError(RuntimeError):
    """Python control flow on a value computed from the tensors' data, not their shapes."""


def describe(node: torch.fx.Node) -> str:
    """``"gt (from sum)"``: a node's op, and the op of its first node argument.

    Example:
        >>> import torch, torch.fx
        >>> g = torch.fx.symbolic_trace(lambda x: x.sum() > 0).graph
        >>> describe(list(g.nodes)[2])
        'gt (from sum)'
    """
    def name(n: torch.fx.Node) -> str:
        return getattr(n.target, "__name__", str(n.target))
    src = next((a for a in n_args(node)), None)
    return name(node) + (f" (from {name(src)})" if src is not None and src.op != "placeholder" else "")


def n_args(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The node arguments of ``node``, in order."""
    return (a for a in node.all_input_nodes)


class ConcreteProxy(TracerProxy):
    """A Proxy whose size questions are answered from its node's example value."""

    @property
    def value(self) -> Any:
        return self.tracer.values[self.node]

    def __getattr__(self, k: str) -> Any:
        if k in META_ATTRS and isinstance(self.value, torch.Tensor):
            return getattr(self.value, k)
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self.value)))

    def __bool__(self) -> bool:
        raise DataDependentError(
            f"Python control flow on a value computed from the data: bool() of {describe(self.node)!r} "
            f"(node {self.node.name}); it is not a size, so tracing with the example shapes cannot resolve it")


class ConcreteAttribute(ConcreteProxy, torch.fx.proxy.Attribute):
    """``proxy.attr`` of a :class:`ConcreteProxy`: a method call or, when used, a ``getattr`` node."""


class ShapeTracer(LeafTracer):
    """``torch.fx.Tracer`` that runs each recorded op on the example inputs (see the module doc).

    Args:
        example_inputs: one value per positional ``forward`` argument.
        leaf_modules: module classes, or qualified names, kept as single ``call_module`` nodes.
    """

    def __init__(self, example_inputs: Sequence[Any], leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__(leaf_modules)
        self.example_inputs = list(example_inputs)
        self.values: dict[torch.fx.Node, Any] = {}
        self._placeholders = 0

    def proxy(self, node: torch.fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def trace(self, root, concrete_args=None) -> torch.fx.Graph:
        """Trace ``root`` (see ``torch.fx.Tracer.trace``) leaving its parameters, buffers and the
        global random state as they were."""
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        saved = {k: v.detach().clone() for k, v in root.state_dict(keep_vars=True).items()}
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                return super().trace(root, concrete_args)
        finally:
            state = root.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in saved.items():
                    if k in state:
                        state[k].data.copy_(v)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        value = self._run(kind, target, args, kwargs)
        if _is_size_query(kind, target, args):
            return value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def _concrete(self, a: Any) -> Any:
        return map_aggregate(a, lambda x: self.values[x.node] if isinstance(x, torch.fx.Proxy) else x)

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The op's value on the example inputs, computed with torch.fx's tracing patches
        (``nn.Module.__call__``, wrapped functions) taken off."""
        with _maybe_revert_all_patches():
            return self._eval(kind, target, args, kwargs)

    def _eval(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.example_inputs):
                return self.example_inputs[i]
            return args[0] if args else None
        if kind == "get_attr":
            return operator.attrgetter(target)(self.root)
        a, kw = self._concrete(args), self._concrete(kwargs)
        if kind == "call_function":
            return target(*a, **kw)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **kw)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **kw)
        raise ValueError(f"ShapeTracer: unexpected node kind {kind!r}")


def _is_size_query(kind: str, target: Any, args: tuple) -> bool:
    if kind == "call_method":
        return target in META_METHODS
    if kind == "call_function":
        if target is getattr:
            return len(args) > 1 and args[1] in META_ATTRS
        return any(target is f for f in META_FUNCTIONS)
    return False
