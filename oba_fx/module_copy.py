"""A faster ``copy.deepcopy`` of a module tree, for copies whose weights are shared.

:func:`deepcopy_modules` returns what ``copy.deepcopy(model, memo)`` returns, without going
through ``__reduce_ex__`` and the generic copy machinery for every module and every hook
dictionary: a module of a class that keeps the default pickling protocol of ``nn.Module`` is
rebuilt directly (new object, ``__setstate__`` with a copy of its ``__dict__``); its plain and
ordered dictionaries are rebuilt entry by entry, its sets and tuples of plain values (numbers,
strings...) directly; every other value (and any module of a class
with its own ``__deepcopy__``, ``__reduce__``, ``__reduce_ex__`` or ``__getstate__``) goes to
``copy.deepcopy`` with the same ``memo``, so shared objects stay shared exactly as there.

Example:
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    >>> shared = {id(p): p for p in m.parameters()}
    >>> c = deepcopy_modules(m, dict(shared))
    >>> c is m, c[0] is m[0], c[0].weight is m[0].weight, c._modules is m._modules
    (False, False, True, False)
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Any

import torch.nn as nn

#: values ``copy.deepcopy`` returns as they are
_ATOMIC = (type(None), int, float, bool, complex, str, bytes, type, range, types.FunctionType,
           types.BuiltinFunctionType)

_ATOMIC_TYPES = frozenset(_ATOMIC)

_plain: dict[type, bool] = {}


def _plain_module_class(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` the way ``nn.Module`` does by default."""
    ok = _plain.get(cls)
    if ok is None:
        ok = _plain[cls] = (issubclass(cls, nn.Module) and getattr(cls, "__deepcopy__", None) is None
                            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
                            and cls.__getstate__ is nn.Module.__getstate__ and not hasattr(cls, "__slots__"))
    return ok


def deepcopy_modules(obj: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(obj, memo)``, faster when ``obj`` is a tree of ordinary modules.

    Args:
        obj: usually an ``nn.Module``; anything else is deep-copied as ``copy.deepcopy`` does.
        memo: ``copy.deepcopy``'s memo: objects (by ``id``) that are returned instead of copied,
            such as the parameters a copy shares with its original. Gets the copies made, by the
            ``id`` of their originals; unlike ``copy.deepcopy`` it does not also keep the
            originals alive (they are alive with ``obj`` while it runs): do not reuse it once
            ``obj`` is gone.
    """
    hit = memo.get(id(obj), memo)
    if hit is not memo:
        return hit
    cls = type(obj)
    if cls in _ATOMIC_TYPES:
        return obj
    if cls is dict or cls is OrderedDict:
        return _copy_dict(obj, memo)
    if cls is tuple and all(type(a) in _ATOMIC_TYPES for a in obj):
        return obj  # as copy.deepcopy: an immutable tuple of immutable values is itself
    if cls is set and all(type(a) in _ATOMIC_TYPES for a in obj):
        new_set = memo[id(obj)] = set(obj)
        return new_set
    if not _plain_module_class(cls):
        return copy.deepcopy(obj, memo)
    new = cls.__new__(cls)
    memo[id(obj)] = new
    new.__setstate__(_copy_dict(obj.__dict__, memo))
    return new


def _copy_dict(d: dict, memo: dict[int, Any]) -> dict:
    """A deep copy of a ``dict`` or ``OrderedDict`` (one without attributes of its own). Plain
    values and empty dictionaries (a module's hook tables) are handled in line: most of a
    module's ``__dict__``."""
    if type(d) is OrderedDict and d.__dict__:  # attributes of its own: the generic way
        return copy.deepcopy(d, memo)
    new = type(d)()
    memo[id(d)] = new
    for k, v in d.items():
        if type(k) not in _ATOMIC_TYPES:
            k = copy.deepcopy(k, memo)
        kind = type(v)
        if kind in _ATOMIC_TYPES:
            new[k] = v
        elif (kind is OrderedDict or kind is dict) and not v and id(v) not in memo and not (
                kind is OrderedDict and v.__dict__):
            new[k] = memo[id(v)] = kind()
        else:
            new[k] = deepcopy_modules(v, memo)
    return new
