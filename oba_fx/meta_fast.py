"""Shortcuts for shape propagation on the ``meta`` device, each giving exactly what the op gives.

On ``meta`` tensors a Conv2d costs tens of microseconds and an ``AdaptiveAvgPool2d``, an ``add``
or an ``empty_like`` hundreds: their shape functions run in Python (``torch._refs``,
``torch._meta_registrations``). For the common cases the result is an empty ``meta`` tensor whose
shape follows from a formula and whose strides are the contiguous ones: these functions build it
directly. Each shortcut applies only where the op's own result is certainly that (the torch.nn
class itself, not a subclass; a contiguous input that is not also channels-last contiguous, so
no layout choice is ambiguous; the checks torch makes passed); anything else returns ``None`` and
the caller runs the op itself, so that torch's own error surfaces.
``tests/test_meta_fast.py`` compares every shortcut with the op it replaces.

Example:
    >>> import torch
    >>> x = torch.empty(2, 3, 8, 8, device="meta")
    >>> conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1).to("meta")
    >>> tuple(module_result(conv, x).shape)
    (2, 5, 4, 4)
    >>> tensor_metadata(x).memory_format
    torch.contiguous_format
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_BINARY = {operator.add, operator.mul, torch.add, torch.mul}
_BINARY_METHODS = {"add", "mul"}
_NUMBER = (int, float)

try:  # the rule torch's meta functions use to lay out elementwise results and ``empty_like``
    from torch._prims_common import compute_elementwise_output_logical_to_physical_perm as _output_perm
except ImportError:  # not in this torch: those ops are run as they are
    _output_perm = None


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``torch.fx.passes.shape_prop._extract_tensor_metadata(t)``, with the memory format from
    the tensor's own contiguity flags instead of recomputing them in Python.

    Example:
        >>> t = torch.empty(1, 4, 3, 3).to(memory_format=torch.channels_last)
        >>> tensor_metadata(t) == _extract_tensor_metadata(t)
        True
    """
    if t.layout is not torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    if t.is_contiguous():
        fmt = torch.contiguous_format
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        fmt = torch.channels_last_3d
    else:
        fmt = None
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _meta_float(x: Any) -> bool:
    """A floating-point strided ``meta`` tensor."""
    return isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point() and x.layout is torch.strided


def _plain(x: Any) -> bool:
    """A floating-point ``meta`` tensor, contiguous and not also channels-last contiguous."""
    return (_meta_float(x) and x.is_contiguous()
            and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            and not (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))


def _empty(shape: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device="meta")


def _contiguous_strides(shape: Any) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _permuted(shape: Any, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """An empty ``meta`` tensor laid out as torch lays out an elementwise result of ``tensors``
    (all of ``shape``): the layout rule of ``torch._prims_common``, called directly; ``None``
    where this torch has no such rule."""
    if _output_perm is None:
        return None
    perm = _output_perm(*tensors)
    return torch.empty_permuted(shape, perm[0] if isinstance(perm, tuple) else perm, dtype=dtype, device="meta")


def like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` on ``meta`` (``empty_like`` runs in Python there).

    Example:
        >>> like(torch.empty(2, 3, device="meta")).stride()
        (3, 1)
    """
    if _plain(x) and x.stride() == _contiguous_strides(x.shape):
        return _empty(x.shape, x)
    if _meta_float(x) and x.dim() > 0:
        out = _permuted(x.shape, [x], x.dtype)
        if out is not None:
            return out
    return torch.empty_like(x)


def _weights_ok(m: nn.Module, x: torch.Tensor) -> bool:
    """The layer's weight (and bias) are tensors of ``x``'s dtype, the bias one per output."""
    w, b = m.weight, m.bias
    return (isinstance(w, torch.Tensor) and w.layout is torch.strided and w.dtype == x.dtype
            and (b is None or (isinstance(b, torch.Tensor) and b.dtype == x.dtype and b.shape == (w.shape[0],))))


def _conv_result(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor | None:
    if m.padding_mode != "zeros" or isinstance(m.padding, str) or x.dim() != n + 2 or not _weights_ok(m, x):
        return None
    w, g = m.weight, m.groups
    if type(g) is not int or g < 1 or w.dim() != n + 2 or x.shape[1] != w.shape[1] * g or w.shape[0] % g \
            or 0 in x.shape or 0 in w.shape:
        return None
    if not len(m.stride) == len(m.padding) == len(m.dilation) == n:
        return None
    out = [x.shape[0], w.shape[0]]
    for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], m.stride, m.padding, m.dilation):
        o = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if o < 1 or s < 1 or d < 1 or p < 0:
            return None
        out.append(o)
    return _empty(out, x)


def _linear_result(m: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() < 1 or not _weights_ok(m, x) or m.weight.dim() != 2 or x.shape[-1] != m.weight.shape[1]:
        return None
    return _empty((*x.shape[:-1], m.weight.shape[0]), x)


def _adaptive_avg_result(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor | None:
    if x.dim() != n + 2 or any(s == 0 for s in x.shape):
        return None
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * n
    if len(size) != n:
        return None
    out = [x.shape[i + 2] if s is None else s for i, s in enumerate(size)]
    if any(not isinstance(s, int) or s < 1 for s in out):
        return None
    return _empty((*x.shape[:2], *out), x)


def module_result(m: nn.Module, x: Any) -> torch.Tensor | None:
    """What the eval-mode module ``m``, with its parameters and buffers on the ``meta`` device
    (wherever they are now), returns for the ``meta`` input ``x``, when it is an empty contiguous
    tensor whose shape follows from a formula; else ``None``.

    Covers ``nn.Conv1d/2d/3d`` (numeric padding, zero padding mode, batched input of any layout),
    ``nn.Linear`` (input of any layout) and ``nn.AdaptiveAvgPool1d/2d/3d`` (batched
    contiguous input).
    """
    kind = type(m)
    if not _meta_float(x):
        return None
    if kind in _CONVS:  # torch's meta convolution and linear layer return contiguous tensors
        return _conv_result(m, x, _CONVS[kind])
    if kind is nn.Linear:
        return _linear_result(m, x)
    if kind in _ADAPTIVE_AVG and _plain(x):  # its layout follows the input's
        return _adaptive_avg_result(m, x, _ADAPTIVE_AVG[kind])
    return None


def _broadcast(shapes: list) -> tuple | None:
    """The broadcast of ``shapes``, or ``None`` where they do not broadcast."""
    out: list[int] = []
    for sizes in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        big = {n for n in sizes if n != 1}
        if len(big) > 1:
            return None
        out.append(big.pop() if big else 1)
    return tuple(reversed(out))


def _binary_result(args: tuple) -> torch.Tensor | None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not all(isinstance(a, torch.Tensor) or type(a) in _NUMBER for a in args):
        return None
    first = tensors[0]
    if not all(_meta_float(t) and t.dim() > 0 and t.dtype == first.dtype for t in tensors):
        return None
    if all(_plain(t) and t.shape == first.shape for t in tensors):  # torch keeps them contiguous
        return _empty(first.shape, first)
    shape = _broadcast([t.shape for t in tensors])
    if shape is None:
        return None
    return _permuted(shape, [t if t.shape == shape else t.expand(shape) for t in tensors], first.dtype)


def _bind(args: tuple, kwargs: dict, names: tuple, defaults: tuple) -> list | None:
    """``args`` and ``kwargs`` as one positional list over ``names`` (the last ones defaulting to
    ``defaults``); ``None`` for anything else (an unknown keyword such as ``out=``)."""
    if len(args) > len(names) or any(k not in names[len(args):] for k in kwargs):
        return None
    rest = names[len(args):]
    required = len(names) - len(defaults)
    full = dict(zip(names[required:], defaults))
    if any(n not in kwargs for n in rest[: max(0, required - len(args))]):
        return None
    return [*args, *(kwargs.get(n, full.get(n)) for n in rest)]


def _cat_result(tensors: Any, dim: Any) -> torch.Tensor | None:
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not all(_plain(t) and t.dtype == first.dtype and t.dim() == first.dim() and t.numel() for t in tensors):
        return None
    nd = first.dim()
    if not -nd <= dim < nd:
        return None
    dim %= nd
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _empty(shape, first)


def _layer_norm_result(x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any) -> torch.Tensor | None:
    if not _meta_float(x) or type(eps) not in _NUMBER or not isinstance(normalized_shape, (tuple, list)):
        return None
    shape = tuple(normalized_shape)
    if not shape or not all(type(n) is int for n in shape) or len(shape) > x.dim() or \
            tuple(x.shape[x.dim() - len(shape):]) != shape or 0 in x.shape:
        return None
    for t in (weight, bias):
        if t is not None and not (_meta_float(t) and t.dtype == x.dtype and tuple(t.shape) == shape):
            return None
    if x.is_contiguous() and x.stride() != _contiguous_strides(x.shape):
        return None  # contiguous with odd strides on size-1 dims: torch keeps them
    out = _empty(x.shape, x)
    return out if _plain(out) else None  # a shape also channels-last contiguous: torch chooses


def _mean_result(x: Any, dim: Any, keepdim: Any, dtype: Any) -> torch.Tensor | None:
    """``x.mean(dim, keepdim)`` over the listed dims of a plain tensor: contiguous, as torch makes it."""
    dims = [dim] if type(dim) is int else dim
    if not _plain(x) or dtype is not None or type(keepdim) is not bool or not isinstance(dims, (list, tuple)) \
            or not dims or not all(type(d) is int for d in dims) or x.dim() == 0 or 0 in x.shape:
        return None
    nd = x.dim()
    if not all(-nd <= d < nd for d in dims) or len({d % nd for d in dims}) != len(dims):
        return None  # torch's own error
    gone = {d % nd for d in dims}
    if keepdim:
        shape = [1 if i in gone else n for i, n in enumerate(x.shape)]
    else:
        shape = [n for i, n in enumerate(x.shape) if i not in gone]
    out = _empty(shape, x)
    return out if out.dim() == 0 or _plain(out) else None  # a shape also channels-last contiguous: torch chooses


def _mean_bound(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """:func:`_mean_result` of ``mean``'s arguments (``dtype`` only by keyword, as in torch)."""
    if len(args) > 3:
        return None
    bound = _bind(args, kwargs, ("input", "dim", "keepdim", "dtype"), (None, False, None))
    return None if bound is None else _mean_result(*bound)


def function_result(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """What ``target(*args, **kwargs)`` returns, for ``add``/``mul`` (``operator``, ``torch``) of
    floating-point tensors of one dtype that broadcast (and Python numbers), ``torch.cat`` of
    contiguous tensors, ``F.layer_norm`` and ``torch.mean`` over listed dims (whose results torch
    makes contiguous); else ``None``.

    Example:
        >>> x = torch.empty(2, 3, device="meta")
        >>> tuple(function_result(operator.add, (x, x), {}).shape)
        (2, 3)
    """
    if target is torch.cat:
        bound = _bind(args, kwargs, ("tensors", "dim"), (0,))
        return None if bound is None else _cat_result(*bound)
    if target is torch.mean:
        return _mean_bound(args, kwargs)
    if target is F.layer_norm:
        bound = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
        return None if bound is None else _layer_norm_result(*bound)
    if kwargs or len(args) != 2 or target not in _BINARY:
        return None
    return _binary_result(args)


def method_result(name: str, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """What ``args[0].<name>(*args[1:], **kwargs)`` returns, for ``Tensor.add`` / ``Tensor.mul`` as
    :func:`function_result`, and ``Tensor.mean`` over listed dims; else ``None``."""
    if name == "mean" and args and isinstance(args[0], torch.Tensor):
        return _mean_bound(args, kwargs)
    if kwargs or len(args) != 2 or name not in _BINARY_METHODS or not isinstance(args[0], torch.Tensor):
        return None
    return _binary_result(args)
