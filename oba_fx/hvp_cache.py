"""Which fused HVP program scores a batch, and a cache of programs by model structure.

:func:`program_for` returns, for a model in its scoring mode and one calibration batch:

1. the program of :mod:`oba_fx.hvp_direct` (generated from the FX graph in well under a second,
   valid for any batch size; CNNs and transformers: a node without a specific rule gets the
   generic one) unless the graph holds something it refuses (a random op, train-mode BatchNorm
   or dropout, an in-place op on a shared tensor, several inputs);
2. else, only when ``make_fx_ok`` (the caller passed ``example_inputs``), the ``make_fx`` program
   of :mod:`oba_fx.hvp_program` for this batch's shape (a one-off trace of seconds);
3. else ``None``: the caller runs the eager fused HVP.

Programs read every tensor from their inputs, so one program serves every model of the same
*structure*: module types and their non-tensor attributes, the graph's code, the parameters' and
buffers' names, shapes and dtypes, the train/eval flags, plus the scored names, Hessian, loss
function and whether gradients are outputs. :func:`structure_key` builds that key; a model with
hooks gets none (not cached). The cache keeps the :data:`CACHE_SIZE` most recent keys
(``steps`` of ``prune_graph`` change the structure, so each step generates once; calls on the
same structure reuse the program). ``clear()`` empties it; ``stats`` counts generations.

Example:
    >>> import torch
    >>> clear()
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> p1 = program_for(m, x, y, names=["0.weight"], hessian="functional", loss_fn=None, with_grad=False)
    >>> p2 = program_for(m, x[:2], y[:2], names=["0.weight"], hessian="functional", loss_fn=None, with_grad=False)
    >>> p1 is p2, stats["generated"]
    (True, 1)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn

from .hvp import LossFn, default_loss_fn
from .hvp_direct import UnsupportedGraph, build_direct_program
from .hvp_program import HVPProgram, build_hvp_program, training_flags

log = logging.getLogger(__name__)

#: number of structures whose programs are kept
CACHE_SIZE = 8
_CACHE: "OrderedDict[Any, list]" = OrderedDict()
#: counters: programs generated (direct / make_fx), cache hits, structures without a direct program
stats = {"generated": 0, "direct": 0, "make_fx": 0, "hits": 0, "unsupported": 0}
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "training", "meta", "_graph", "_code", "_in_spec", "_out_spec"}


def clear() -> None:
    """Empty the cache and reset :data:`stats`."""
    _CACHE.clear()
    for k in stats:
        stats[k] = 0


def _attr_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version, tuple(v.shape), v.dtype)
    if isinstance(v, (dict, nn.Module)):
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_attr_key(i) for i in v)
    if isinstance(v, (set, frozenset)):
        return frozenset(_attr_key(i) for i in v)
    try:
        hash(v)
    except TypeError:
        return ("unhashable", id(v))
    return v


def structure_key(model: nn.Module) -> tuple | None:
    """A hashable key equal for models that compute the same function of their tensors, or
    ``None`` when the model has hooks (never cached).

    Example:
        >>> import copy
        >>> a = torch.nn.Conv2d(2, 3, 3)
        >>> structure_key(a) == structure_key(copy.deepcopy(a)), structure_key(a) == structure_key(torch.nn.Conv2d(2, 4, 3))
        (True, False)
    """
    mods = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            return None
        attrs = tuple(sorted((k, _attr_key(v)) for k, v in vars(m).items()
                             if k not in _SKIP_ATTRS and not k.endswith("hooks") and _attr_key(v) is not None))
        is_gm = isinstance(m, torch.fx.GraphModule)  # each GraphModule has a class of its own
        mods.append((name, "GraphModule" if is_gm else type(m), m.training, attrs, m.code if is_gm else None))
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device.type, t.requires_grad)
                    for n, t in list(model.named_parameters()) + list(model.named_buffers()))
    return tuple(mods), tensors


def program_for(model: nn.Module, x: Any, y: Any, *, names: Sequence[str], hessian: str, loss_fn: LossFn | None,
                with_grad: bool, make_fx_ok: bool = False) -> HVPProgram | None:
    """The cached (or newly generated) program for ``model`` and this batch, or ``None``."""
    loss_fn = loss_fn or default_loss_fn
    skey = structure_key(model)
    key = None if skey is None else (skey, tuple(names), hessian, loss_fn, with_grad)
    entry = _CACHE.get(key) if key is not None else None
    if entry is not None:
        _CACHE.move_to_end(key)
        for prog in entry:
            if isinstance(prog, HVPProgram) and prog.matches(model, x, y):
                stats["hits"] += 1
                return prog
        if not make_fx_ok:
            return None
    prog = _generate(model, x, y, names, hessian, loss_fn, with_grad, make_fx_ok, entry is not None)
    if key is not None:
        _CACHE.setdefault(key, []).append(prog if prog is not None else "unsupported")
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prog


def _generate(model: nn.Module, x: Any, y: Any, names: Sequence[str], hessian: str, loss_fn: LossFn,
              with_grad: bool, make_fx_ok: bool, direct_failed: bool) -> HVPProgram | None:
    if not direct_failed:
        try:
            prog = build_direct_program(model, param_names=names, loss_fn=loss_fn, hessian=hessian,
                                        with_grad=with_grad)
            stats["generated"] += 1
            stats["direct"] += 1
            return prog
        except UnsupportedGraph as e:
            stats["unsupported"] += 1
            log.info("no direct HVP program (%s)", e)
    if not make_fx_ok or not isinstance(x, torch.Tensor):
        return None
    log.info("generating the make_fx HVP program for input shape %s", tuple(x.shape))
    prog = build_hvp_program(model, (x, y), param_names=names, loss_fn=loss_fn, hessian=hessian, with_grad=with_grad)
    stats["generated"] += 1
    stats["make_fx"] += 1
    return prog


__all__ = ["program_for", "structure_key", "clear", "stats", "CACHE_SIZE", "training_flags"]
