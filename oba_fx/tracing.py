"""Symbolic tracing with a leaf policy, and errors that say where tracing failed.

Example:
    >>> import torch
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import contextlib
import copy
import io
import linecache
import logging
import os
import sys
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx
import torch.nn as nn

from . import attention
from .checks import check_model
from .errors import BadInputError, TraceError
from .leaf_tracer import LeafTracer
from .meta import SPECIALISED
from .meta_shapes import meta_shapes as _meta_shapes
from .module_copy import deepcopy_modules, install_targets, module_tree_copy, tensors_by_id

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(tb) -> str | None:
    """The innermost traceback frame outside torch: the user's line that failed."""
    best = None
    for fs in traceback.extract_tb(tb):
        if not fs.filename.startswith(_TORCH_DIR) and "oba_fx" not in fs.filename:
            best = fs
    if best is None:
        return None
    line = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno}: {line}"


def trace(model: nn.Module, *, leaf_modules: Iterable[type | str] = (),
          concrete_args: dict[str, Any] | None = None, lower_attention: bool = True,
          example_inputs: Sequence[Any] | None = None, share_weights: bool = False) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` (the user's model is never touched).

    When symbolic tracing fails and ``example_inputs`` are given, the model is traced again with
    :class:`oba_fx.shape_tracing.ShapeTracer`, which answers size questions (``x.shape``,
    ``x.size(1)``, ``len(x)``) with the example inputs' sizes: shape-driven control flow then
    traces, and the graph is specialised to those input shapes, which ``gm.meta["oba.specialised"]``
    records (input shapes, and why symbolic tracing failed).

    With ``share_weights`` the copy's modules are new but its parameters and buffers are the
    model's own tensors (no copy of the weights; :func:`oba_fx.module_copy.module_tree_copy`
    shares the modules' other attributes too): only for an analysis that reads the graph and
    never writes a weight (``oba_fx.explain``, ``oba_fx.hessian_structure``); the GraphModule then
    writes its ``forward`` code on first use (:func:`graph_module`).

    With ``lower_attention`` every ``nn.MultiheadAttention`` of the copy (unless listed in
    ``leaf_modules``) is traced as :class:`oba_fx.attention.MultiheadAttention` (same parameters,
    same result), whose heads can be pruned; the unused attention weights it would return are
    dropped from the graph.

    Raises:
        BadTypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.
        TraceError: naming the module being traced and the user's source line, with the ways
            out (leaf modules, ``concrete_args``); with ``example_inputs``, the error of the
            shape-aware attempt (control flow on the data, naming the op).
    """
    check_model(model, "torch.fx tracing", finite=False)
    shared = {}
    if share_weights and not isinstance(model, torch.fx.GraphModule):
        root = module_tree_copy(model)
    else:
        shared = tensors_by_id(model) if share_weights else {}
        root = deepcopy_modules(model, dict(shared))
    if isinstance(root, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(root, copy.deepcopy(root.graph))
        specialised = root.meta.get(SPECIALISED)
        gm.meta.clear()
        if specialised is not None:  # a graph traced with example shapes stays specialised to them
            gm.meta[SPECIALISED] = specialised
        return gm
    try:
        return _trace_with(LeafTracer(leaf_modules), root, model, concrete_args, lower_attention, share_weights)
    except TraceError as e:
        if example_inputs is None:
            raise
        first = e
    log.info("symbolic tracing failed (%s); tracing again with the example input shapes", first.why)
    from .shape_tracing import ShapeTracer  # it builds on LeafTracer

    shape_tracer = ShapeTracer(as_tuple(example_inputs), leaf_modules)
    try:
        again = module_tree_copy(model) if share_weights else deepcopy_modules(model, dict(shared))
        gm = _trace_with(shape_tracer, again, model, concrete_args, lower_attention, share_weights)
    except TraceError as e:
        raise TraceError(e.where, f"{e.why} (tracing again with the example input shapes did not help; "
                         f"plain symbolic tracing said: {first.why})", e.line) from e
    gm.meta[SPECIALISED] = specialisation(example_inputs, first)
    log.warning("%s is traced specialised to input shapes %s (shape-driven control flow at %s); the pruned "
                "model expects inputs of these shapes", type(model).__name__,
                gm.meta[SPECIALISED]["input_shapes"], first.line or first.where)
    return gm


def _trace_with(tracer: torch.fx.Tracer, root: nn.Module, model: nn.Module, concrete_args: dict | None,
                lower_attention: bool, lazy: bool = False) -> torch.fx.GraphModule:
    """``tracer`` on ``root`` (a copy of ``model``); failures as :class:`TraceError`. With ``lazy``
    the GraphModule generates its Python code on first use (:func:`graph_module`)."""
    lowered = attention.lower_attention(root, tracer.leaf_names, tracer.leaf_types) if lower_attention else []
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:
        stack = list(getattr(tracer, "module_stack", {}) or {})
        where = f"module {stack[-1]!r}" if stack and stack[-1] else f"model {type(model).__name__}"
        raise TraceError(where, f"{type(e).__name__}: {e}", _user_frame(e.__traceback__)) from e
    gm = graph_module(tracer.root, graph, type(root).__name__, lazy)
    attention.drop_dead_code(gm, lowered)
    return gm


def graph_module(root: nn.Module, graph: torch.fx.Graph, name: str, lazy: bool) -> torch.fx.GraphModule:
    """``torch.fx.GraphModule(root, graph, name)``; with ``lazy`` one that writes and compiles its
    ``forward`` code only when it is first called or its ``code`` read (torch's
    ``_LazyGraphModule``, where this torch has it), which is most of building a GraphModule and
    what an analysis that only reads the graph never needs.

    Example:
        >>> g = torch.fx.symbolic_trace(torch.nn.ReLU()).graph
        >>> gm = graph_module(torch.nn.Module(), g, "M", lazy=True)
        >>> isinstance(gm, torch.fx.GraphModule), gm(torch.tensor([-1.0, 2.0])).tolist()
        (True, [0.0, 2.0])
    """
    if lazy:
        try:
            from torch.fx._lazy_graph_module import _LazyGraphModule
        except ImportError:  # an older torch: built eagerly
            pass
        else:
            gm = _LazyGraphModule(root, torch.fx.Graph(), name)
            install_targets(gm, root, graph)  # what GraphModule(root, graph) copies, faster
            gm.graph = graph
            if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
                gm._tracer_cls = graph._tracer_cls  # as GraphModule.__init__ records them
            if graph._tracer_extras:
                gm._tracer_extras = graph._tracer_extras
            return gm
    return torch.fx.GraphModule(root, graph, name)


def specialisation(example_inputs: Any, error: TraceError) -> dict:
    """The ``gm.meta["oba.specialised"]`` record: the input shapes the graph is specialised to and
    why symbolic tracing failed.

    Example:
        >>> import torch
        >>> specialisation((torch.zeros(1, 3),), TraceError("model M", "TraceError: control flow", "m.py:3: if"))
        {'input_shapes': [[1, 3]], 'reason': 'TraceError: control flow', 'at': 'm.py:3: if'}
    """
    shapes = [list(x.shape) if isinstance(x, torch.Tensor) else None for x in as_tuple(example_inputs)]
    return {"input_shapes": shapes, "reason": error.why, "at": error.line or error.where}


def as_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def check_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Raise ``ValueError`` if the example inputs do not match the traced signature."""
    n_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in n_ph if not n.args]
    if len(example_inputs) < len(required) or len(example_inputs) > len(n_ph):
        raise BadInputError(
            f"example_inputs has {len(example_inputs)} positional input(s), but the traced model takes "
            f"{len(required)} to {len(n_ph)} ({', '.join(n.name for n in n_ph)}); pass a tuple with one "
            "tensor per forward() argument")


def clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Deep copy of ``gm`` without its graph-level analysis records (``gm.meta``)."""
    saved = dict(gm.meta)
    gm.meta.clear()
    try:
        return copy.deepcopy(gm)
    finally:
        gm.meta.update(saved)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run ``module`` in eval mode without autograd, then restore every submodule's mode.

    Shape propagation and verification use it, so that neither updates BatchNorm running
    statistics nor draws dropout masks.
    """
    modes = [(m, m.training) for m in module.modules()]
    if type(module).eval is not nn.Module.eval or any(type(m).train is not nn.Module.train for m, _ in modes):
        module.eval()  # a module's own eval() / train() decides
    else:  # what nn.Module.eval() does, without its recursive calls
        for m, t in modes:
            if t:
                m.training = False
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, t in modes:
            if m.training != t:
                m.training = t


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` chain."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


@contextlib.contextmanager
def held_stderr():
    """Hold back what the block writes to ``sys.stderr``: written out when it succeeds, dropped
    when it raises. torch's ``ShapeProp`` prints the traceback of a failing node before raising;
    the error raised in its place already says what failed, so the traceback is only noise.

    Example:
        >>> with held_stderr():
        ...     print("kept", file=sys.stderr)
    """
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def _clear_shapes(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)


def propagate_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> None:
    """``tensor_meta`` on every node: on the ``meta`` device when every op allows it, else with
    fake tensors when every op supports them, else with the real inputs. Eval mode, no
    autograd, no state changes (the shapes and dtypes are the same three ways; the strides of
    some results, e.g. attention, einsum, normalisations of transposed inputs, may differ, and
    nothing in oba_fx reads them).

    Example:
        >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))
        >>> propagate_shapes(gm, (torch.randn(2, 3, 5, 5),))
        >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"]
        [(2, 3, 5, 5), (2, 4, 3, 3), (2, 36)]
        >>> next(gm.parameters()).device.type  # the parameters are back
        'cpu'
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    with eval_mode(gm):
        try:
            _meta_shapes(gm, inputs)
            return
        except Exception:  # no meta kernel, a value read, a CPU tensor mixed in: fake tensors
            _clear_shapes(gm)
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            with held_stderr():
                ShapeProp(gm, fake_mode=mode).propagate(*fake)
            return
        except Exception:  # an op without a fake kernel, data-dependent shapes...: run for real
            _clear_shapes(gm)
        with held_stderr():
            ShapeProp(gm).propagate(*inputs)
