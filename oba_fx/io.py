"""Saving and loading slimmed models: a ``torch.fx.GraphModule`` together with its report.

:func:`save` writes one file that :func:`load` turns back into a working GraphModule with the same
weights, the same outputs and the same ``gm.meta`` (the report ``gm.meta["oba"]`` of
:func:`oba_fx.prune_graph`). Loading needs neither the class of the model that was pruned nor its
original weights: the file holds the GraphModule's generated Python source (``gm.code``) and its
submodules, parameters and buffers, and ``load`` re-traces that source (torch.fx's own
serialisation, which never stores the ``Graph`` object or the traced model's class). What it does
need is every class and function the *slimmed* module still refers to: ``torch`` for a model made
of ``torch.nn`` layers and torch functions; the user's module for a custom leaf module (see
``leaf_modules`` of :func:`oba_fx.prune_graph`) or a ``torch.fx.wrap``-ped function. :func:`save`
refuses classes defined inside a function, which no program could import again.

A plain ``torch.save(gm)`` also loads without the original class, but it drops ``gm.meta`` (the
report) and refers to oba_fx's tracer class; :func:`load` reads such files too (with an empty
report).

Security: the file is a pickle (``torch.load(..., weights_only=False)``), and unpickling, like
the generated code it re-runs, can execute arbitrary code. Only load files you trust.

File layout (``torch.save`` of a dict): ``format`` (``"oba_fx.graph_module"``), ``version``,
``torch_version``, ``code`` (the generated source, for reading), ``graph_module`` (the module,
pickled by torch.fx), ``meta`` (``gm.meta``), ``training``, ``masks`` (``{parameter name: bool
mask}`` of the unstructured masks of :func:`oba_fx.prune_unstructured`: torch cannot pickle a
parametrized module, so the module is stored with its masked weights and :func:`load` registers
the masks again; empty otherwise).

Example:
    >>> import os, tempfile, torch, oba_fx
    >>> from oba_fx.io import save, load
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> gm = oba_fx.prune_graph(m, torch.randn(1, 8), channel_ratio=0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
    >>> _ = save(gm, path)
    >>> back = load(path)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(back(x), gm(x)), back.meta["oba"] == gm.meta["oba"], back.get_submodule("0").out_features
    (True, True, 8)
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from .files import check_writable
from oba_fx.errors import (BadFileError, BadInputError, BadTypeError, MissingFileError, UnimportableError,
                           one_line)

__all__ = ["FORMAT", "VERSION", "load", "save"]

logger = logging.getLogger(__name__)

#: Value of the ``format`` key of a file written by :func:`save`.
FORMAT = "oba_fx.graph_module"
#: Version of that layout; :func:`load` reads this version and older ones.
VERSION = 1


def _unimportable(gm: torch.fx.GraphModule) -> list[str]:
    """Classes and functions the module refers to that were defined inside a function."""
    bad = []
    for name, mod in gm.named_modules():
        cls = type(mod)
        if "<locals>" in cls.__qualname__ and not isinstance(mod, torch.fx.GraphModule):
            bad.append(f"submodule {name!r} is a {cls.__module__}.{cls.__qualname__}")
    for node in gm.graph.nodes:
        if node.op == "call_function" and "<locals>" in getattr(node.target, "__qualname__", ""):
            t = node.target
            bad.append(f"node {node.name!r} calls {getattr(t, '__module__', '?')}.{t.__qualname__}")
    return bad


def _main_refs(gm: torch.fx.GraphModule) -> list[str]:
    refs = {f"{type(m).__qualname__}" for m in gm.modules() if type(m).__module__ == "__main__"}
    refs |= {n.target.__qualname__ for n in gm.graph.nodes
             if n.op == "call_function" and getattr(n.target, "__module__", None) == "__main__"}
    return sorted(refs)


def save(gm: torch.fx.GraphModule, path: str | os.PathLike) -> Path:
    """Write ``gm`` (code, submodules, weights and ``gm.meta``) to ``path``.

    The write is atomic (a temporary file next to ``path``, then :func:`os.replace`): a crash
    never leaves a half-written file under ``path``. ``gm`` is not modified.

    Args:
        gm: The GraphModule, e.g. from :func:`oba_fx.prune_graph`.
        path: Destination file; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        BadTypeError: (a ``TypeError``) ``gm`` is not a ``torch.fx.GraphModule``.
        BadInputError: (a ``ValueError``) ``gm`` uses a class or function defined inside a
            function (it could not be loaded again); ``gm.meta`` cannot be pickled.
        MissingFileError: (a ``FileNotFoundError``) the folder of ``path`` does not exist.
        BadFileError: (an ``OSError``) ``path`` cannot be written (checked before any work).

    Example:
        >>> import os, tempfile, torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> gm.meta["note"] = {"ok": 1}
        >>> p = save(gm, os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> load(p).meta
        {'note': {'ok': 1}}
    """
    path = Path(path)
    if not isinstance(gm, torch.fx.GraphModule):
        raise BadTypeError(f"save expects a torch.fx.GraphModule (e.g. from oba_fx.prune_graph), got "
                        f"{type(gm).__name__}; for other modules use torch.save(model.state_dict(), path)")
    check_writable(path, "save")
    bad = _unimportable(gm)
    if bad:
        raise BadInputError("cannot save a module that refers to classes or functions defined inside a function "
                         "(no program could import them to load it): " + "; ".join(bad)
                         + ". Define them at module level.")
    gm, masks = _without_masks(gm)
    main = _main_refs(gm)
    if main:
        logger.warning("the saved module refers to %s from __main__: loading it needs them defined in the "
                       "loading program's __main__ too (better: define them in an importable module)", main)
    # A copy that shares the submodules and tensors but not the Graph: its tracer class is reset to
    # torch.fx's default, so that the file does not refer to whichever tracer produced ``gm``
    # (re-tracing the generated code at load time keeps every submodule a leaf anyway).
    graph = copy.deepcopy(gm.graph)
    if hasattr(graph, "_tracer_cls"):
        graph._tracer_cls = None
    plain = torch.fx.GraphModule(gm, graph, class_name="GraphModule")
    plain.meta = {}  # stored once, below (torch.fx's unpickling would drop it anyway)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "code": gm.code,
        "graph_module": plain,
        "meta": dict(gm.meta),
        "training": gm.training,
        "masks": masks,
    }
    try:
        atomic_save(payload, path)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise BadInputError(f"cannot save to {str(path)!r}: the module or gm.meta holds something that cannot be "
                            f"pickled: {one_line(exc)}") from exc
    logger.info("saved GraphModule (%d parameters) to %s",
                sum(p.numel() for p in gm.parameters()), path)
    return path


def _without_masks(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor]]:
    """``(gm, {})``, or for a module with unstructured masks (:mod:`oba_fx.unstructured`, which
    torch cannot pickle) a copy with the masks made permanent and the masks themselves."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in gm.modules()):
        return gm, {}
    from .unstructured import unmasked_copy

    plain, masks = unmasked_copy(gm)
    other = [n for n, m in plain.named_modules() if parametrize.is_parametrized(m)]
    if other:
        raise BadInputError(f"cannot save: modules {other[:4]} carry parametrizations other than oba_fx's weight masks; "
                         "remove them first (torch.nn.utils.parametrize.remove_parametrizations)")
    plain.meta = gm.meta
    return plain, masks


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never sees
    a half-written file, and an interrupted save leaves the old one intact. A failure to write
    names ``path`` (never the temporary file) and says why.

    Example:
        >>> atomic_save({"a": 1}, "/nonexistent/folder/m.pt")
        Traceback (most recent call last):
        ...
        oba_fx.errors.MissingFileError: save: cannot write '/nonexistent/folder/m.pt': the folder \
'/nonexistent/folder' does not exist; create it or pass a path in an existing folder
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        check_writable(path, "save")
        raise BadFileError(f"save: cannot write {str(path)!r}: {exc.strerror or one_line(exc)}; pass a path in "
                           "a writable folder") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise BadFileError(f"save: cannot write {str(path)!r}: {exc.strerror or one_line(exc)} (is the disk "
                           "full?); pass a path with room to write") from exc
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def load(path: str | os.PathLike, *, map_location: Any = None) -> torch.fx.GraphModule:
    """Read a GraphModule written by :func:`save` (or by ``torch.save(gm)``).

    Warning:
        This unpickles the file and runs the code stored in it: only load files you trust.

    Args:
        path: The file.
        map_location: As in :func:`torch.load`, e.g. ``"cpu"`` for a model saved on a GPU.

    Returns:
        The GraphModule, with ``meta`` (the report) and train/eval mode as saved.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) no file at ``path``.
        BadFileError: (an ``OSError``) ``path`` is a folder, or the file cannot be read as a saved
            module (truncated, corrupt, not torch.save).
        UnimportableError: (an ``ImportError``) the module refers to a class or function that
            cannot be imported here.
        BadInputError: (a ``ValueError``) the file holds something else (e.g. a state_dict) or a
            newer format version.

    Example:
        >>> load("/nonexistent/model.pt")
        Traceback (most recent call last):
        ...
        oba_fx.errors.MissingFileError: no saved model at '/nonexistent/model.pt'; pass a file written by \
oba_fx.save (or oba-fx prune --out)
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"no saved model at {str(path)!r}; pass a file written by oba_fx.save "
                               "(or oba-fx prune --out)")
    if not path.is_file():
        raise BadFileError(f"{str(path)!r} is a folder, not a saved model; pass the file written by oba_fx.save")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError) as exc:
        raise UnimportableError(f"cannot load {str(path)!r}: it refers to a class or function that cannot be "
                                f"imported here ({one_line(exc)}); import or define it before loading") from exc
    except Exception as exc:  # unpickling arbitrary bytes can raise almost anything (OverflowError, KeyError...)
        raise BadFileError(f"cannot read {str(path)!r} as a saved model (truncated or corrupt, or not written by "
                           f"oba_fx.io.save / torch.save): {type(exc).__name__}: {one_line(exc)}") from exc
    if isinstance(obj, torch.fx.GraphModule):
        logger.warning("%s holds a bare GraphModule (plain torch.save): no report in gm.meta", path)
        return obj
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise BadInputError(f"{str(path)!r} holds {what}, not a module saved by oba_fx.io.save")
    if obj.get("version", 0) > VERSION:
        raise BadInputError(f"{str(path)!r} has format version {obj['version']}; this oba_fx reads version "
                         f"{VERSION} or older: upgrade oba_fx")
    gm = obj["graph_module"]
    if not isinstance(gm, nn.Module):
        raise BadInputError(f"{str(path)!r}: 'graph_module' holds a {type(gm).__name__}, not a module")
    gm.meta = obj.get("meta", {})
    gm.training = bool(obj.get("training", gm.training))
    if obj.get("masks"):
        from .unstructured import apply_masks

        apply_masks(gm, obj["masks"])
    if obj.get("torch_version") != torch.__version__:
        logger.info("%s was written by torch %s, read by torch %s", path, obj.get("torch_version"),
                    torch.__version__)
    return gm
