"""Shape propagation on the ``meta`` device (the first and fastest way of
:func:`oba_fx.tracing.propagate_shapes`).

The graph runs on empty ``meta`` tensors: shape functions only, no values. Most ops get their
result from :mod:`oba_fx.meta_fast` (a formula) without running; an op that has to run gets its
module's parameters and buffers swapped for ``meta`` tensors of the same shape, dtype, strides
and ``requires_grad`` first (so are the tensors read by ``get_attr``), and every swapped tensor is
put back at the end, also when a node fails.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
    >>> meta_shapes(gm, (torch.randn(2, 3, 5, 5),))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"]
    [(2, 3, 5, 5), (2, 4, 3, 3), (2, 36)]
    >>> next(gm.parameters()).device.type
    'cpu'
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from . import meta_fast

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: functions whose ``meta`` kernels run long decompositions in Python and that repeat with the same
#: input layouts in every block of a model: their result layout is computed once per layout
_MEMOIZED = frozenset({F.scaled_dot_product_attention})
#: torch.nn modules whose eval-mode output on a floating-point tensor is a tensor like it
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.Dropout, nn.Identity)


def _like_input(m: nn.Module, target: str, x: Any) -> bool:
    """Whether the module ``m`` called on ``x`` alone returns a tensor like ``x``, after the
    checks torch itself makes on the input (raised here as torch raises them)."""
    kind = type(m)  # the classes themselves: a subclass may override forward
    if m.training or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False
    if kind in _BATCH_NORMS:
        m._check_input_dim(x)
        if x.shape[1] != m.num_features:
            raise ValueError(f"{target}: expected {m.num_features} channels, got shape {tuple(x.shape)}")
        return True
    if kind is nn.LayerNorm:
        k = len(m.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(m.normalized_shape) or x.dim() < k:
            raise ValueError(f"{target}: normalized_shape {tuple(m.normalized_shape)} does not end shape "
                             f"{tuple(x.shape)}")
        return True
    return kind in _ELEMENTWISE


def on_meta(t: torch.Tensor) -> torch.Tensor:
    """An empty ``meta`` tensor with the shape, strides and dtype of ``t``."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class _MetaShapes(torch.fx.Interpreter):
    """Runs a graph on ``meta`` tensors and writes ``tensor_meta`` (as ``ShapeProp``) and ``type``.

    Eval-mode BatchNorm, LayerNorm and activation modules (the torch.nn classes themselves) return
    a tensor like their input after torch's own input checks: on ``meta`` their decompositions run
    in Python and cost more than the rest of the shape propagation. Call :meth:`restore` after
    :meth:`run`, also when it raises.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)  # see run()
        self._swapped: list[tuple[dict, str, torch.Tensor]] = []
        self._on_meta: set[int] = set()  # ids of the modules whose tensors are swapped
        self._layouts: dict[tuple, tuple] = {}  # _MEMOIZED calls: input layouts -> result layout

    def run(self, *args: Any) -> Any:
        """``Interpreter.run`` without its progress bar and without freeing values as it goes:
        a disabled ``tqdm`` still starts a monitor thread and a multiprocessing lock the first
        time one is made in a process (about 1.5 ms, most of a small model's shape propagation
        on a first call), and ``meta`` values cost no memory. Errors propagate as raised (the
        caller falls back to fake tensors)."""
        self.env = {}
        self.args_iter = iter(self.graph.process_inputs(*args))
        for node in self.graph.nodes:
            self.env[node] = value = self.run_node(node)
            if node.op == "output":
                return self.graph.process_outputs(value)
        return None

    def _to_meta(self, module: nn.Module) -> None:
        """Swap the parameters and buffers of ``module`` and its submodules for ``meta`` tensors."""
        for mod in module.modules():
            if id(mod) in self._on_meta:
                continue
            self._on_meta.add(id(mod))
            for table in (mod._parameters, mod._buffers):
                for k, t in list(table.items()):
                    if t is not None:
                        self._swapped.append((table, k, t))
                        m = on_meta(t)
                        table[k] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m

    def restore(self) -> None:
        """Put every swapped parameter and buffer back."""
        for table, k, t in reversed(self._swapped):
            table[k] = t
        self._swapped.clear()
        self._on_meta.clear()

    def _shortcut(self, n: torch.fx.Node) -> Any:
        """``n``'s value from :mod:`oba_fx.meta_fast` (or an eval-mode module that returns a tensor
        like its input), without the interpreter's per-node bookkeeping; ``None`` when the op
        has to run."""
        if n.op == "call_module":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if kwargs or len(args) != 1:
                return None
            m = self.submodules.get(n.target) or self.fetch_attr(n.target)
            if _like_input(m, n.target, args[0]):
                return meta_fast.like(args[0])
            return meta_fast.module_result(m, args[0])
        if n.op == "call_function":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.target in _MEMOIZED:
                return self._memoized(n.target, args, kwargs)
            return meta_fast.function_result(n.target, args, kwargs)
        if n.op == "call_method":
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return meta_fast.method_result(n.target, args, kwargs)
        return None

    def _memoized(self, target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``target(*args, **kwargs)`` for a :data:`_MEMOIZED` function of ``meta`` tensors and plain
        values: run once per key (each tensor's shape, strides, offset, dtype, ``requires_grad``;
        every other argument; grad mode), a new empty tensor of the remembered layout after that.
        ``None`` (run as usual) for arguments it cannot key."""
        key = _layout_key(target, args, kwargs)
        if key is None:
            return None
        layout = self._layouts.get(key)
        if layout is None:
            out = target(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                return out
            self._layouts[key] = (tuple(out.shape), out.stride(), out.storage_offset(), out.dtype, out.requires_grad)
            return out
        shape, stride, offset, dtype, grad = layout
        out = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        if offset:
            out = out.as_strided(shape, stride, offset)
        return out.requires_grad_(grad) if grad else out

    def _prepare(self, n: torch.fx.Node) -> None:
        """Before ``n`` runs: the tensors it reads from the module tree on ``meta``."""
        if n.op == "call_module":
            self._to_meta(self.fetch_attr(n.target))
        elif n.op == "get_attr":
            owner, _, _ = n.target.rpartition(".")
            self._to_meta(self.fetch_attr(owner) if owner else self.module)

    def run_node(self, n: torch.fx.Node) -> Any:
        result = self._shortcut(n)
        if result is None:
            self._prepare(n)
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = meta_fast.tensor_metadata(result)
        else:
            found = False

            def record(obj: Any) -> Any:
                nonlocal found
                if isinstance(obj, torch.Tensor):
                    found = True
                    return meta_fast.tensor_metadata(obj)
                return obj

            meta = map_aggregate(result, record)
            if found:
                n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _layout_key(target: Any, args: tuple, kwargs: dict) -> tuple | None:
    """A hashable key of a call on ``meta`` tensors that fixes its result's layout; ``None`` if an
    argument is neither a ``meta`` tensor nor a plain value.

    Example:
        >>> q = torch.empty(1, 2, 3, 4, device="meta")
        >>> _layout_key(F.scaled_dot_product_attention, (q, q, q), {"is_causal": True})[-1]
        (('is_causal', True),)
    """
    def part(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            if a.device.type != "meta" or type(a) not in (torch.Tensor, nn.Parameter):
                raise _Unkeyable
            return (tuple(a.shape), a.stride(), a.storage_offset(), a.dtype, a.requires_grad)
        if a is None or type(a) in (bool, int, float, str):
            return a
        raise _Unkeyable

    try:
        return (target, torch.is_grad_enabled(), tuple(part(a) for a in args),
                tuple((k, part(v)) for k, v in sorted(kwargs.items())))
    except _Unkeyable:
        return None


class _Unkeyable(Exception):
    """An argument :func:`_layout_key` cannot put in a key."""


def meta_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Shapes from the ``meta`` device (shape functions only, no Python dispatch: several times
    faster than fake tensors). Raises where an op has no meta kernel, reads values or mixes in a
    tensor the swap did not reach (a plain tensor attribute, a tensor built on the CPU). Run it
    in :func:`oba_fx.tracing.eval_mode`."""
    args = [on_meta(x).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and x.is_floating_point()
            else on_meta(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    shapes = _MetaShapes(gm)
    try:
        shapes.run(*args)
    finally:
        shapes.restore()
