"""The rule type, the registries, and what rules see (coupling, slim and FLOPs contexts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from .. import meta as M
from ..coupling import EMPTY, Builder, Space, TensorSpaces, _State


# ============================================================================ the rule type
@dataclass(frozen=True)
class OpRule:
    """How one op is handled everywhere in the pipeline.

    Attributes:
        name: short name used in reports.
        couple: ``fn(ctx: Ctx) -> None``; sets the node's spaces and records unions/pins.
        slim: ``fn(ctx: SlimCtx) -> None``; rewrites the module or the node's constants.
        flops: ``fn(ctx: FlopCtx) -> int``; ``None`` counts zero.
        curvature: second-derivative class (module docstring).
    """

    name: str
    couple: Callable[["Ctx"], None]
    slim: Callable[["SlimCtx"], None] | None = None
    flops: Callable[["FlopCtx"], int] | None = None
    curvature: str = "linear"


MODULE_RULES: dict[type, OpRule] = {}
FUNCTION_RULES: dict[Any, OpRule] = {}
METHOD_RULES: dict[str, OpRule] = {}


def _register(rule: OpRule, modules=(), functions=(), methods=()) -> OpRule:
    for m in modules:
        MODULE_RULES[m] = rule
    for f in functions:
        FUNCTION_RULES[f] = rule
    for name in methods:
        METHOD_RULES[name] = rule
    return rule


def rule_for_module(module: nn.Module) -> OpRule | None:
    """The rule of a leaf module, by exact type (a subclass may override ``forward``)."""
    return MODULE_RULES.get(type(module))


def rule_for_function(fn: Any) -> OpRule | None:
    return FUNCTION_RULES.get(fn)


def rule_for_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpRule | None:
    """The rule that applies to ``node``, or ``None`` (a barrier)."""
    if node.op == "call_module":
        return rule_for_module(gm.get_submodule(node.target))
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


# ============================================================================ contexts
def _shape(arg: Any) -> tuple[int, ...] | None:
    if isinstance(arg, torch.fx.Node):
        tm = arg.meta.get(M.TENSOR_META)
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
    return None


def _spaces(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get(M.SPACES)
    return None


def _ts(arg: Any) -> TensorSpaces:
    v = _spaces(arg)
    return v if isinstance(v, TensorSpaces) else EMPTY


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, torch.fx.Node):
            if _shape(a) is not None:
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


class Ctx:
    """What a coupling rule sees: the node, its module, input spaces and the builder."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, b: Builder, state: _State):
        self.gm, self.node, self.b, self.state = gm, node, b, state

    @property
    def module(self) -> nn.Module:
        return self.gm.get_submodule(self.node.target)

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        return _shape(self.node)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.node, i, name, default)

    def ts(self, arg: Any) -> TensorSpaces:
        return _ts(arg)

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

    def dim_map(self, src: Any, mapping: dict[int, int | None], consumed: tuple[int, ...] = ()) -> dict[int, Space]:
        """Carry ``src``'s spaces to the output along ``mapping`` (in dim -> out dim); a space
        whose dim maps to ``None`` (or is missing) is pinned, unless the rule itself handles
        it (``consumed``). Returns the new out spaces by out dim."""
        out: dict[int, Space] = {}
        for s in _ts(src).spaces:
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
    """Make ``node`` a barrier: pin every space it reads, give its value no spaces."""
    for a in _tensor_args(node):
        b.pin_all(_spaces(a))
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
        return _ts(arg)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return _arg(self.node, i, name, default)

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
    sh = list(_shape(arg))
    for s in _ts(arg).spaces:
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
        return self.shape(_tensor_args(self.node)[i])


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


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


