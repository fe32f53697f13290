"""The rule type, the registries, and what rules see (coupling, slim and FLOPs contexts)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from .. import meta as M
from ..spaces import EMPTY, Builder, Space, TensorSpaces, AnalysisState
from oba_fx.errors import BadInputError


# ============================================================================ the rule type
class Curvature(str, Enum):
    """Second-derivative class of an op, read by the Hessian-structure analysis
    (:mod:`oba_fx.hessian_blocks`; ``docs/design.md`` "Which Hessian blocks")."""

    #: parameterised affine map, bilinear in (parameter, input): conv, linear, BN (eval)
    LAYER = "layer"
    #: linear in its tensor inputs, no second derivative: add, cat, reshape, pad
    LINEAR = "linear"
    #: piecewise linear, zero second derivative almost everywhere: ReLU, max-pool
    PIECEWISE = "piecewise"
    #: product of two inputs: mul, matmul, einsum
    BILINEAR = "bilinear"
    #: ``a / b``: bilinear across the operands and smooth in the denominator
    QUOTIENT = "quotient"
    #: non-zero second derivative in every input: GELU, sigmoid, softmax, LayerNorm
    SMOOTH = "smooth"
    #: ``softmax(q kᵀ + mask) v``: smooth in (q, k, mask), linear in v, bilinear across
    ATTENTION = "attention"
    #: parameterised layer that is also smooth in its input (BatchNorm with batch statistics)
    SMOOTH_LAYER = "smooth+layer"
    #: not understood: assumed to mix everything that reaches it
    UNKNOWN = "unknown"
    #: carries no tensors (size arithmetic, constants)
    NONE = "none"


@dataclass(frozen=True)
class OpRule:
    """How one op is handled everywhere in the pipeline.

    Attributes:
        name: short name used in reports.
        couple: ``fn(ctx: Ctx) -> None``; sets the node's spaces and records unions/pins.
        slim: ``fn(ctx: SlimCtx) -> None``; rewrites the module or the node's constants.
        flops: ``fn(ctx: FlopCtx) -> int``; ``None`` counts zero.
        curvature: second-derivative class (a :class:`Curvature`; its value string is accepted).
        curvature_of: ``fn(module) -> Curvature`` (a module rule) or ``fn(node) -> Curvature`` (a
            function or method rule) for an op whose class depends on its state or arguments
            (BatchNorm with batch statistics is smooth); ``None``: always :attr:`curvature`.
        sums: the op adds its tensor operands elementwise (``a + b``): channels several layers
            write and this op sums form a residual stream (:func:`oba_fx.select.summed_units`).
        renormalises: ``"layer"`` or ``"rms"`` for a norm over the last dim whose kept channels
            are renormalised when some are removed (the masked reference does the same, see
            :func:`oba_fx.masking.masked_norm`); ``None`` otherwise.
    """

    name: str
    couple: Callable[["Ctx"], None]
    slim: Callable[["SlimCtx"], None] | None = None
    flops: Callable[["FlopCtx"], int] | None = None
    curvature: Curvature = Curvature.LINEAR
    curvature_of: Callable[[nn.Module], Curvature] | None = None
    renormalises: str | None = None
    sums: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "curvature", Curvature(self.curvature))
        except ValueError:
            raise BadInputError(f"op rule {self.name!r}: unknown curvature {self.curvature!r}; expected one of "
                             f"{[c.value for c in Curvature]}") from None
        if self.renormalises not in (None, "layer", "rms"):
            raise BadInputError(f"op rule {self.name!r}: renormalises must be None, 'layer' or 'rms', "
                             f"got {self.renormalises!r}")

    def curvature_for(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> Curvature:
        """The curvature class of this use of the op."""
        if self.curvature_of is None:
            return self.curvature
        if node.op == "call_module":
            return Curvature(self.curvature_of(gm.get_submodule(node.target)))
        return Curvature(self.curvature_of(node))


MODULE_RULES: dict[type, OpRule] = {}
FUNCTION_RULES: dict[Any, OpRule] = {}
METHOD_RULES: dict[str, OpRule] = {}


def register(rule: OpRule, modules: Iterable[type] = (), functions: Iterable[Any] = (), methods: Iterable[str] = (),
             *, replace: bool = False) -> OpRule:
    """Declare ``rule`` for module classes (exact type), functions and tensor-method names.

    This is how every built-in op is declared, and how a user adds a rule for their own leaf
    module or function without editing the package (``docs/design.md`` "Adding an op rule";
    the README has a complete example). A module class with a rule must be traced as a leaf
    (``prune_graph(..., leaf_modules=[MyLayer])``) unless it is a ``torch.nn`` module.

    Args:
        rule: the :class:`OpRule`.
        modules: module classes it applies to (matched by exact type).
        functions: callables it applies to (``call_function`` targets).
        methods: tensor-method names it applies to (``call_method`` targets).
        replace: allow replacing an existing rule for one of these keys.

    Returns:
        ``rule``.

    Raises:
        ValueError: a key already has another rule and ``replace`` is false, or a key is of the
            wrong kind.

    Example:
        >>> from oba_fx.ops import OpRule, register, rule_for_module
        >>> class Twice(torch.nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> from oba_fx.ops.generic import couple_broadcast
        >>> _ = register(OpRule("twice", couple_broadcast), modules=[Twice])
        >>> rule_for_module(Twice()).name
        'twice'
    """
    if not isinstance(rule, OpRule):
        raise BadInputError(f"register expects an oba_fx.ops.OpRule, got {type(rule).__name__}")
    keys = [(MODULE_RULES, m, "module class") for m in modules] + [(FUNCTION_RULES, f, "function") for f in functions]
    keys += [(METHOD_RULES, n, "method name") for n in methods]
    for table, key, what in keys:
        if what == "module class" and not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise BadInputError(f"op rule {rule.name!r}: modules= takes nn.Module subclasses, got {key!r}")
        if what == "method name" and not isinstance(key, str):
            raise BadInputError(f"op rule {rule.name!r}: methods= takes method names (str), got {key!r}")
        old = table.get(key)
        if old is not None and old is not rule and not replace:
            raise BadInputError(f"{what} {getattr(key, '__qualname__', key)!r} already has the op rule {old.name!r}; "
                             "pass replace=True to override it")
    for table, key, _ in keys:
        table[key] = rule
    return rule


def rule_for_module(module: nn.Module) -> OpRule | None:
    """The rule of a leaf module, by exact type (a subclass may override ``forward``)."""
    return MODULE_RULES.get(type(module))


def rule_for_function(fn: Any) -> OpRule | None:
    return FUNCTION_RULES.get(fn)


def submodule(gm: torch.fx.GraphModule, target: str, modules: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """``gm.get_submodule(target)``, read from ``modules`` (``dict(gm.named_modules())``) when there.

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
        >>> submodule(gm, "0", dict(gm.named_modules())) is gm.get_submodule("0")
        True
    """
    m = modules.get(target) if modules is not None else None
    return gm.get_submodule(target) if m is None else m


def rule_for_node(gm: torch.fx.GraphModule, node: torch.fx.Node,
                  modules: Mapping[str, nn.Module] | None = None) -> OpRule | None:
    """The rule that applies to ``node``, or ``None`` (a barrier). ``modules``: see :func:`submodule`."""
    if node.op == "call_module":
        return rule_for_module(submodule(gm, node.target, modules))
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


# ============================================================================ contexts
def shape_of(arg: Any) -> tuple[int, ...] | None:
    if isinstance(arg, torch.fx.Node):
        tm = arg.meta.get(M.TENSOR_META)
        if tm is not None and hasattr(tm, "shape"):
            return tuple(map(int, tm.shape))
    return None


def spaces_of(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get(M.SPACES)
    return None


def tensor_spaces(arg: Any) -> TensorSpaces:
    v = spaces_of(arg)
    return v if isinstance(v, TensorSpaces) else EMPTY


def node_arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _arg_nodes(node: torch.fx.Node, keep: Callable[[torch.fx.Node], bool]) -> list[torch.fx.Node]:
    """The nodes among ``node``'s arguments (tuples, lists and dicts searched) for which ``keep``."""
    out: list[torch.fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            if keep(a):
                out.append(a)
        elif isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The arguments of ``node`` whose value is a tensor of known shape."""
    return _arg_nodes(node, lambda a: shape_of(a) is not None)


def tuple_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The arguments of ``node`` whose value is a tuple of tensors (``x.chunk(2, 1)`` passed whole)."""
    return _arg_nodes(node, lambda a: isinstance(a.meta.get(M.TENSOR_META), (tuple, list)))


class Ctx:
    """What a coupling rule sees: the node, its module, input spaces and the builder."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, b: Builder, state: AnalysisState):
        self.gm, self.node, self.b, self.state = gm, node, b, state

    @functools.cached_property
    def module(self) -> nn.Module:
        """The called module (looked up once per node: rules ask for it several times)."""
        return submodule(self.gm, self.node.target, self.state.modules)

    @functools.cached_property
    def out_shape(self) -> tuple[int, ...] | None:
        return shape_of(self.node)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return node_arg(self.node, i, name, default)

    def ts(self, arg: Any) -> TensorSpaces:
        return tensor_spaces(arg)

    def new(self, dim: int, size: int | None = None) -> Space:
        size = self.out_shape[dim] if size is None else size
        return self.b.tensor_space(self.node, dim, size)

    def param(self, attr: str, dim: int, primary: bool = True) -> Space:
        t = getattr(self.module, attr)
        return self.b.param_space(f"{self.node.target}.{attr}", dim, t.shape[dim], primary)

    def set(self, value: Any) -> None:
        self.node.meta[M.SPACES] = value

    def barrier(self, reason: str) -> None:
        barrier(self.node, self.b, reason)

    def pin_because(self, space: Space | None, reason: str) -> None:
        """Pin ``space`` (an input's dim this use of the op cannot slim exactly) and report the
        node as a barrier with ``reason``; the op's other dims still carry their spaces."""
        if space is not None:
            self.b.pin(space)
            self.b.barrier(self.node, reason)

    def dim_map(self, src: Any, mapping: dict[int, int | None], consumed: tuple[int, ...] = ()) -> dict[int, Space]:
        """Carry ``src``'s spaces to the output along ``mapping`` (in dim -> out dim); a space
        whose dim maps to ``None`` (or is missing) is pinned, unless the rule itself handles
        it (``consumed``). Returns the new out spaces by out dim."""
        out: dict[int, Space] = {}
        for s in tensor_spaces(src).spaces:
            if s.dim in consumed:
                continue
            od = mapping.get(s.dim)
            if od is None:
                self.b.pin(s)
                continue
            o = self.new(od)
            if o.size != s.size:
                self.b.pin(s)
                continue
            self.b.union(s, o)
            out[od] = o
        return out


def barrier(node: torch.fx.Node, b: Builder, reason: str) -> None:
    """Make ``node`` a barrier: pin every space it reads (tuple values included: the result of
    ``chunk``/``split`` passed whole), give its value no spaces."""
    for a in tensor_args(node) + tuple_args(node):
        b.pin_all(spaces_of(a))
    b.barrier(node, reason)
    v = node.meta.get(M.TENSOR_META)
    node.meta[M.SPACES] = EMPTY if v is None or hasattr(v, "shape") else tuple(EMPTY for _ in v)


# ============================================================================ slim / flops contexts
class SlimCtx:
    """What a slim rule sees: the node in the graph being slimmed and the kept indices."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, coupling, removed: np.ndarray):
        self.gm, self.node, self.c, self.removed = gm, node, coupling, removed

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    def ts(self, arg: Any) -> TensorSpaces:
        return tensor_spaces(arg)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return node_arg(self.node, i, name, default)

    def kept(self, space: Space) -> np.ndarray:
        return self.c.kept(space, self.removed)

    def new_shape(self, arg: Any) -> tuple[int, ...]:
        return new_shape(arg, self.c, self.removed)

    def param_kept(self, attr: str, dim: int) -> torch.Tensor | None:
        """Kept indices of ``module.attr`` along ``dim``; ``None`` when nothing is removed."""
        s = self.c.param_spaces.get((f"{self.node.target}.{attr}", dim))
        if s is None:
            return None
        k = self.kept(s)
        return None if k.size == s.size else torch.as_tensor(k, dtype=torch.long)


def new_shape(arg: Any, c, removed: np.ndarray) -> tuple[int, ...]:
    """Shape of a node's value after removing the units in ``removed``."""
    sh = list(shape_of(arg))
    for s in tensor_spaces(arg).spaces:
        sh[s.dim] = int((~removed[c.units_of(s)]).sum())
    return tuple(sh)


class FlopCtx:
    """What a FLOPs rule sees: shapes of the node and its inputs, before or after removal."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, shape_fn: Callable[[Any], tuple]):
        self.gm, self.node, self.shape = gm, node, shape_fn

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    @property
    def out(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def inp(self, i: int = 0) -> tuple[int, ...]:
        return self.shape(tensor_args(self.node)[i])


def slice_attr(module: nn.Module, attr: str, dim: int, idx: torch.Tensor | None) -> None:
    """Replace ``module.attr`` by its rows ``idx`` along ``dim`` (keeps Parameter-ness)."""
    if idx is None:
        return
    t = getattr(module, attr)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        new = nn.Parameter(new, requires_grad=t.requires_grad)
    setattr(module, attr, new)


def numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


