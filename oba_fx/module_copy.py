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

:func:`module_tree_copy` is the cheaper copy for an analysis that only reads the result: new
module objects with their own tables, every value in them shared; :func:`install_targets` builds
what ``torch.fx.GraphModule(root, graph)`` copies from its root, faster.
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.fx
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


def module_tree_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of the module tree whose modules are new objects with their own attribute
    dictionary and their own parameter, buffer and submodule tables, and which shares everything
    else with ``model``: the tensors themselves, hooks, plain attributes. Changing a copy's mode
    (``train()``), swapping one of its parameters for another tensor or replacing one of its
    submodules leaves ``model`` as it was; writing into a shared tensor or a shared container
    does not. For an analysis that reads the graph and never writes a weight (the trace behind
    ``oba_fx.explain``); about four times faster than :func:`deepcopy_modules` on torchvision
    models. A module of a class with its own copying or pickling protocol (or ``__slots__``) is
    copied by :func:`deepcopy_modules` with the model's tensors shared.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> c = module_tree_copy(m)
        >>> c[0] is m[0], c[0].weight is m[0].weight, c[0]._parameters is m[0]._parameters
        (False, True, False)
        >>> c.train(False).training, m.training
        (False, True)
    """
    memo = {} if memo is None else memo
    hit = memo.get(id(model))
    if hit is not None:
        return hit
    cls = type(model)
    if not _plain_module_class(cls):
        new = memo[id(model)] = deepcopy_modules(model, tensors_by_id(model))
        return new
    new = cls.__new__(cls)
    memo[id(model)] = new
    state = dict(model.__dict__)
    state["_parameters"] = type(model._parameters)(model._parameters)
    state["_buffers"] = type(model._buffers)(model._buffers)
    state["_modules"] = type(model._modules)(
        (k, None if v is None else module_tree_copy(v, memo)) for k, v in model._modules.items())
    new.__dict__.update(state)
    return new


def install_targets(gm: torch.fx.GraphModule, root: nn.Module, graph: torch.fx.Graph) -> None:
    """Put into ``gm`` what ``torch.fx.GraphModule(root, graph)`` copies from ``root``: each
    ``call_module`` and ``get_attr`` target at its qualified name, with new empty ``nn.Module``
    containers on the way (built from a template's attribute dictionary: ``nn.Module()`` costs
    about 50 µs each, most of building a GraphModule of a torchvision model), a tensor that is
    not a parameter as a buffer (persistent as in ``root``).

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
        >>> g = torch.fx.symbolic_trace(m).graph
        >>> gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
        >>> install_targets(gm, m, g)
        >>> [n for n, _ in gm.named_modules()], gm.get_submodule("0.0") is m[0][0]
        (['', '0', '0.0', '1'], True)
    """
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        *prefix, field = node.target.split(".")
        src, dst = root, gm
        for item in prefix:
            src = getattr(src, item)
            nxt = dst._modules.get(item)
            if nxt is src:  # a parent already installed whole
                break
            if nxt is None:
                nxt = _empty_module()
                if item in dst.__dict__:  # torch's own rule for a name taken by a plain attribute
                    setattr(dst, item, nxt)
                else:
                    dst._modules[item] = nxt
            dst = nxt
        else:
            value = getattr(src, field)
            if isinstance(value, nn.Module) and field not in dst.__dict__:
                dst._modules[field] = value
            elif isinstance(value, nn.Module):
                setattr(dst, field, value)
            elif isinstance(value, nn.Parameter):
                dst._parameters[field] = value
            elif isinstance(value, torch.Tensor):
                dst.register_buffer(field, value, persistent=field not in src._non_persistent_buffers_set)
            else:
                setattr(dst, field, value)


_TEMPLATE: list[nn.Module] = []


def _empty_module() -> nn.Module:
    """A new ``nn.Module()`` without running ``nn.Module.__init__``: the attribute dictionary of
    a template, with new empty tables."""
    if not _TEMPLATE:
        _TEMPLATE.append(nn.Module())
    new = nn.Module.__new__(nn.Module)
    new.__dict__.update({k: (type(v)() if isinstance(v, (dict, set, list)) else v)
                         for k, v in _TEMPLATE[0].__dict__.items()})
    return new


def tensors_by_id(model: nn.Module) -> dict[int, torch.Tensor]:
    """Every parameter and buffer of ``model`` by ``id`` (those of ``model.parameters()`` and
    ``model.buffers()``, in one walk over the modules): the memo of a copy that shares them."""
    return {id(t): t for m in model.modules() for table in (m._parameters, m._buffers)
            for t in table.values() if t is not None}
