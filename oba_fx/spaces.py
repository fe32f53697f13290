"""The coupling data model: index spaces, units, groups, and the builder op rules write to.

Every prunable dimension of a tensor (a node's value) or of a parameter/buffer is a
:class:`Space`; every index of a space is an *element* with a global id. Op rules
(:mod:`oba_fx.ops`) record through a :class:`Builder` which elements must be removed together
and which are pinned; :meth:`Builder.build` turns that into a frozen :class:`Coupling`.
:func:`oba_fx.coupling.analyze` walks the graph. This module imports neither.

Example:
    >>> b = Builder()
    >>> w = b.param_space("fc.weight", 0, 3, primary=True)
    >>> bias = b.param_space("fc.bias", 0, 3, primary=True)
    >>> b.union(w, bias)
    >>> c = b.build()
    >>> c.n_units, int(c.prunable.sum())
    (3, 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.fx

from .unionfind import compact_min, components


@dataclass(frozen=True)
class Space:
    """One prunable dimension of a tensor value or of a tensor attribute.

    Attributes:
        id: index in :attr:`Coupling.spaces`.
        kind: ``"tensor"`` (a node's value) or ``"param"`` (a parameter or buffer).
        owner: node name (tensor) or qualified attribute name such as ``"layer1.0.conv1.weight"``.
        dim: the dimension of that tensor.
        size: its length.
        base: global id of element 0; element ``i`` is ``base + i``.
    """

    id: int
    kind: str
    owner: str
    dim: int
    size: int
    base: int

    def elements(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Global element ids of indices ``idx`` (all indices when ``None``)."""
        if idx is None:
            return np.arange(self.base, self.base + self.size, dtype=np.int64)
        return self.base + np.asarray(idx, dtype=np.int64)


@dataclass(frozen=True)
class TensorSpaces:
    """The spaces of one tensor value: at most one space per dimension.

    ``node.meta["oba.spaces"]`` holds a ``TensorSpaces`` for a tensor-valued node and a tuple
    of them (or ``None``) for a node that returns a tuple of tensors (split, chunk).
    """

    spaces: tuple[Space, ...] = ()

    def at(self, dim: int) -> Space | None:
        for s in self.spaces:
            if s.dim == dim:
                return s
        return None

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(s.dim for s in self.spaces)


EMPTY = TensorSpaces()


@dataclass(frozen=True)
class Heads:
    """The attention heads of one attention op: ``space`` has one index per head.

    Attributes:
        node: the attention node (``scaled_dot_product_attention``, a softmax over scores, ...).
        module: qualified name of the module whose ``forward`` holds it (``""`` at the root).
        space: the head space (its units say which heads are removed together).
    """

    node: str
    module: str
    space: Space


@dataclass(frozen=True)
class Barrier:
    """A node whose channels were made unprunable, and why."""

    node: str
    op: str
    target: str
    reason: str


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Coupling:
    """Result of :func:`analyze` (stored in ``gm.meta["oba.coupling"]``).

    Attributes:
        spaces: every space, indexed by ``Space.id``.
        unit: ``int64[n_elements]``, the unit of each element.
        n_units: number of units.
        pinned: ``bool[n_units]``, units that may never be removed.
        prunable: ``bool[n_units]``, not pinned and containing a primary element.
        group: ``int64[n_units]``, the coupling group of each unit.
        primary: ids of primary spaces (a layer's own channel dims; they are scored).
        param_spaces: ``(qualified attribute name, dim) -> Space``.
        barriers: nodes that blocked pruning, with the reason.
        heads: the attention ops found, with their head spaces (for reports).
    """

    spaces: tuple[Space, ...]
    unit: np.ndarray
    n_units: int
    pinned: np.ndarray
    prunable: np.ndarray
    group: np.ndarray
    primary: frozenset[int]
    param_spaces: Mapping[tuple[str, int], Space]
    barriers: tuple[Barrier, ...]
    heads: tuple[Heads, ...] = ()

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.group.size else 0

    def units_of(self, space: Space) -> np.ndarray:
        """Unit id of each index of ``space``."""
        return self.unit[space.base : space.base + space.size]

    def kept(self, space: Space, removed: np.ndarray) -> np.ndarray:
        """Indices of ``space`` whose unit is not in ``removed`` (a ``bool[n_units]`` mask)."""
        return np.nonzero(~removed[self.units_of(space)])[0]

    def primary_spaces(self) -> list[Space]:
        return [self.spaces[i] for i in sorted(self.primary)]


class Builder:
    """Collects spaces, unions and pins while the op rules walk the graph."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self._n = 0
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._same: list[tuple[int, int]] = []  # spaces tied index by index (identity unions)
        self._pins: list[np.ndarray] = []
        self._param: dict[tuple[str, int], Space] = {}
        self.primary: set[int] = set()
        self.barriers: list[Barrier] = []
        self.heads: list[Heads] = []

    # -- spaces --------------------------------------------------------------------------
    def _new(self, kind: str, owner: str, dim: int, size: int) -> Space:
        s = Space(len(self.spaces), kind, owner, dim, int(size), self._n)
        self.spaces.append(s)
        self._n += int(size)
        return s

    def tensor_space(self, node: torch.fx.Node, dim: int, size: int) -> Space:
        """A new space for dimension ``dim`` of ``node``'s value."""
        return self._new("tensor", node.name, dim, size)

    def param_space(self, name: str, dim: int, size: int, primary: bool) -> Space:
        """The (shared) space of dimension ``dim`` of tensor attribute ``name``."""
        key = (name, dim)
        s = self._param.get(key)
        if s is None:
            s = self._param[key] = self._new("param", name, dim, size)
        if primary:
            self.primary.add(s.id)
        return s

    @property
    def param_spaces(self) -> Mapping[tuple[str, int], Space]:
        """The parameter spaces made so far, by ``(qualified name, dim)``."""
        return self._param

    # -- relations -----------------------------------------------------------------------
    def union(self, a: Space, b: Space, ia: Any = None, ib: Any = None) -> None:
        """Tie index ``ia[k]`` of ``a`` to index ``ib[k]`` of ``b`` (identity when ``None``)."""
        if ia is None and ib is None:  # recorded per space: build() merges such spaces first
            if a.size != b.size:
                raise ValueError(f"union of spaces of different sizes: {a} / {b}")
            self._same.append((a.id, b.id))
            return
        ea, eb = a.elements(ia), b.elements(ib)
        if ea.shape != eb.shape:
            raise ValueError(f"union of spaces of different sizes: {a} / {b}")
        self._a.append(ea)
        self._b.append(eb)

    def union_many(self, elements: np.ndarray) -> None:
        """Tie all given global element ids together."""
        e = np.asarray(elements, dtype=np.int64).ravel()
        if e.size > 1:
            self._a.append(e[:-1])
            self._b.append(e[1:])

    def union_rows(self, elements: np.ndarray) -> None:
        """Tie the global element ids of each row of a 2-D array together (rows stay apart).

        Example:
            >>> b = Builder()
            >>> s = b.param_space("w", 0, 4, primary=True)
            >>> b.union_rows(s.elements().reshape(2, 2))
            >>> b.build().unit.tolist()
            [0, 0, 1, 1]
        """
        e = np.asarray(elements, dtype=np.int64)
        if e.ndim == 2 and e.shape[1] > 1:
            self._a.append(e[:, :-1].ravel())
            self._b.append(e[:, 1:].ravel())

    def pin(self, space: Space | None, idx: Any = None) -> None:
        if space is not None:
            self._pins.append(space.elements(idx))

    def pin_all(self, ts: Any) -> None:
        """Pin every space found in a (nested) spaces value."""
        for s in iter_spaces(ts):
            self.pin(s)

    def mark_heads(self, node: torch.fx.Node, space: Space | None) -> None:
        """Record ``space`` as the head dimension of the attention op ``node``."""
        if space is not None:
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else ""
            self.heads.append(Heads(node.name, str(module), space))

    def barrier(self, node: torch.fx.Node, reason: str) -> None:
        self.barriers.append(Barrier(node.name, node.op, target_name(node.target), reason))

    # -- result --------------------------------------------------------------------------
    def _canonical(self) -> np.ndarray:
        """Each element's canonical element: index ``i`` of the smallest space tied to its space
        index by index (through identity unions), so ``canonical[e] <= e``."""
        canon = np.arange(self._n, dtype=np.int64)
        if self._same:
            ends = np.asarray(self._same, dtype=np.int64)
            rep = components(len(self.spaces), ends[:, 0], ends[:, 1])
            for s in self.spaces:
                r = self.spaces[rep[s.id]]
                if r is not s:
                    canon[s.base : s.base + s.size] = canon[r.base : r.base + r.size]
        return canon

    def _groups(self, unit: np.ndarray, n_units: int, canon: np.ndarray) -> np.ndarray:
        """Group of each unit: units connected through shared spaces. A space tied index by index
        to a smaller one has that one's units, so only canonical spaces are walked; the units
        of a space are chained (consecutive elements), so the labels are the smallest unit."""
        if not n_units:
            return np.zeros(0, np.int64)
        sizes = np.fromiter((s.size for s in self.spaces), np.int64, len(self.spaces))
        space_of = np.repeat(np.arange(len(self.spaces), dtype=np.int64), sizes)
        keep = canon == np.arange(self._n)
        u, sp = unit[keep], space_of[keep]
        chained = sp[1:] == sp[:-1]
        return compact_min(components(n_units, u[:-1][chained], u[1:][chained]))[0]

    def build(self) -> Coupling:
        n = self._n
        canon = self._canonical()
        a = canon[np.concatenate(self._a)] if self._a else np.zeros(0, np.int64)
        b = canon[np.concatenate(self._b)] if self._b else np.zeros(0, np.int64)
        # an element's component holds its canonical element, which is no larger: the smallest
        # member of a component is a canonical element, the label components() gives it
        unit, n_units = compact_min(components(n, a, b)[canon])
        pinned = np.zeros(n_units, dtype=bool)
        if self._pins:
            pinned[unit[np.concatenate(self._pins)]] = True
        has_primary = np.zeros(n_units, dtype=bool)
        for i in self.primary:
            sp = self.spaces[i]
            has_primary[unit[sp.base : sp.base + sp.size]] = True
        group = self._groups(unit, n_units, canon)
        return Coupling(
            spaces=tuple(self.spaces),
            unit=_frozen(unit),
            n_units=n_units,
            pinned=_frozen(pinned),
            prunable=_frozen(has_primary & ~pinned),
            group=_frozen(group),
            primary=frozenset(self.primary),
            param_spaces=dict(self._param),
            barriers=tuple(self.barriers),
            heads=tuple(self.heads),
        )


def iter_spaces(value: Any) -> Iterable[Space]:
    """Every :class:`Space` in a nested spaces value (TensorSpaces, tuples, None)."""
    if isinstance(value, TensorSpaces):
        yield from value.spaces
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_spaces(v)


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}".lstrip(".")


@dataclass
class AnalysisState:
    """Per-analysis scratch: size values that carry channel counts (``x.shape[1]``), and the
    reshape split choices."""

    taint: dict[str, frozenset[int]] = field(default_factory=dict)
    size_vec: dict[str, tuple[frozenset[int], ...]] = field(default_factory=dict)
    #: (reshape node, input dim) -> which varying output dim carries the space (0 = outermost)
    split_choice: dict[tuple[str, int], int] = field(default_factory=dict)
    #: splits with a choice: (key, number of varying dims, the chosen output space)
    splits: list = field(default_factory=list)
    #: couple (rather than pin) the channels LayerNorm / RMSNorm normalise
    norm_width: bool = False
    #: ``dict(gm.named_modules())``, to look modules up without walking their dotted names
    modules: dict = field(default_factory=dict)
