"""Turning per-parameter scores into removed units, against a target.

Scores arrive per parameter (``{name: tensor of the parameter's shape}``, see
:mod:`oba_fx.criteria`, :func:`oba_fx.score`). For each prunable unit, each member layer's entries are summed
(signed), the absolute value taken, averaged over the member layers, normalised by the
maximum in the unit's coupling group, and all units are ranked globally (``docs/design.md`` "The maths").

Example:
    >>> import numpy as np
    >>> order_with_caps(np.array([0.3, 0.1, 0.2]), [[(0, 1)], [(0, 1)], [(1, 1)]],
    ...                 np.array([2, 1]), np.array([0.5, 0.99])).tolist()
    [1]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from .spaces import Coupling
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)

#: exponent ``β`` of ``ranking="curvature"``: a group's removal fraction scales as its relative
#: flatness ``(mean density / its density)^β`` (as :func:`oba_fx.unstructured.adaptive_fractions`)
CURVATURE_BETA = 0.5


@dataclass(frozen=True)
class Selection:
    """Which units are removed (``gm.meta["oba.selection"]``).

    Attributes:
        removed: ``bool[n_units]``.
        scores: ``float[n_units]`` normalised unit scores (``nan`` where not prunable).
        flops: predicted FLOPs after removal.
        params: predicted parameter count after removal.
    """

    removed: np.ndarray
    scores: np.ndarray
    flops: int
    params: int


#: how unit scores are made comparable across groups before the global ranking
RANKINGS = ("group_max", "per_flop", "global", "curvature")


def unit_scores(c: Coupling, param_scores: Mapping[str, torch.Tensor], ranking: str = "group_max",
                unit_cost: np.ndarray | None = None) -> np.ndarray:
    """Per-unit importance from per-parameter scores (``nan`` for units that are not prunable).

    Each member layer's entries are summed (signed) over the unit, the absolute value taken and
    averaged over the member layers. Space costs (``{(name, dim): cost per index}``, from
    criteria such as ``"obs"``) are instead summed over every index of the unit in every space
    they cover; a prunable unit they do not cover is not ranked (``nan``: kept). Then, with
    ``ranking="group_max"`` (the OBA paper's rule), each score is divided by the maximum of the
    unit's coupling group; with ``"per_flop"`` by ``unit_cost`` (the FLOPs the unit's removal
    saves, :func:`unit_flops`): loss change per FLOP, so that cheap units of heterogeneous groups
    (DenseNet growth channels, heads vs MLP neurons) are neither starved nor emptied; with
    ``"global"`` not at all (scores that already estimate the loss change, comparable across
    groups); with ``"curvature"`` they become removal keys that give each group a removal
    fraction from its share of the scores (:func:`curvature_keys`).
    """
    if ranking not in RANKINGS:
        raise BadInputError(f"unknown ranking {ranking!r}; expected one of {RANKINGS}")
    if any(isinstance(k, tuple) for k in param_scores):
        out = _space_cost_scores(c, param_scores)
        ok = ~np.isnan(out)
    else:
        out = _primary_scores(c, param_scores)
        ok = ~np.isnan(out)
    if ranking == "per_flop":
        if unit_cost is None:
            raise BadInputError("ranking='per_flop' needs unit_cost (the FLOPs each unit's removal saves)")
        cost = np.asarray(unit_cost, dtype=np.float64)[ok]
        out[ok] = out[ok] / np.maximum(cost, 1.0)
    elif ranking == "curvature":
        out = curvature_keys(c.group, out)
    elif ranking == "group_max":
        gmax = np.zeros(c.n_groups)
        np.maximum.at(gmax, c.group[ok], out[ok])
        denom = gmax[c.group[ok]]
        out[ok] = np.where(denom > 0, out[ok] / np.where(denom > 0, denom, 1), 0.0)
    return out


def curvature_keys(group: np.ndarray, scores: np.ndarray, beta: float = CURVATURE_BETA) -> np.ndarray:
    """Removal keys that share the removals out among groups by their density of score
    (``ranking="curvature"``: CAMP-HiVe's curvature-adaptive per-layer thresholds, structured).

    A group's share is the sum of its units' scores (for ``"camp"``, the λ-weighted eigenvector
    importance: its part of the dominant curvature), its density ``d_g`` that share per unit and
    ``r_g = (d̄ / d_g)^β`` its relative flatness (``d̄`` the density over all ranked units). The
    ``k``-th lowest-scored of a group's ``n_g`` units gets the key ``(k / n_g) / r_g``, so that
    removing all units under a key ``a`` removes the fraction ``≈ a · r_g`` of every group: flat
    groups lose more, sharp ones less, in proportion. The removal order, the caps
    (``max_layer_ratio``, ``min_channels``) and the search for the FLOPs / parameter target are
    then those of every ranking (:func:`select`), so the target is met as exactly; a multi-step
    run rescores, hence re-estimates the shares, at every step.

    ``nan`` scores (units not ranked) stay ``nan``; a group whose scores sum to zero gets keys
    in ``(0, 1e-12]`` (removed first, in its own order).

    Example:
        >>> keys = curvature_keys(np.array([0, 0, 1, 1]), np.array([4.0, 4.0, 1.0, 1.0]), beta=1.0)
        >>> keys.round(3).tolist()   # group 0 is 4x denser: its units come later
        [0.8, 1.6, 0.2, 0.4]
    """
    out = np.full(scores.shape, np.nan)
    ok = ~np.isnan(scores)
    if not ok.any():
        return out
    mean_density = float(scores[ok].sum()) / int(ok.sum())
    for g in np.unique(group[ok]):
        units = np.nonzero(ok & (group == g))[0]
        s = scores[units]
        density = float(s.sum()) / units.size
        flat = (mean_density / density) ** beta if density > 0 else 0.0
        frac = np.empty(units.size)
        frac[np.argsort(s, kind="stable")] = np.arange(1, units.size + 1) / units.size
        out[units] = frac / flat if flat > 0 else frac * 1e-12
    return out


def _space_cost_scores(c: Coupling, costs: Mapping) -> np.ndarray:
    """Per-unit sums of additive space costs ``{(name, dim): cost per index}`` (``nan`` where none)."""
    total = np.zeros(c.n_units)
    covered = np.zeros(c.n_units, dtype=bool)
    for key, t in costs.items():
        s = c.param_spaces.get(tuple(key))
        if s is None:
            continue
        u = c.units_of(s)
        np.add.at(total, u, t.detach().double().cpu().numpy().reshape(-1))
        covered[u] = True
    out = np.full(c.n_units, np.nan)
    ok = c.prunable & covered
    out[ok] = total[ok]
    return out


def _primary_scores(c: Coupling, param_scores: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Per-unit mean over member layers of ``|signed sum of the unit's entries|`` (``nan`` where none)."""
    total = np.zeros(c.n_units)
    members = np.zeros(c.n_units)
    for s in c.primary_spaces():
        t = param_scores.get(s.owner)
        if t is None:
            continue
        t = t.detach().double()
        dims = [d for d in range(t.dim()) if d != s.dim]
        vec = (t.sum(dim=dims) if dims else t).cpu().numpy()
        u = c.units_of(s)
        per_unit = np.zeros(c.n_units)
        np.add.at(per_unit, u, vec)
        uu = np.unique(u)
        total[uu] += np.abs(per_unit[uu])
        members[uu] += 1
    out = np.full(c.n_units, np.nan)
    ok = c.prunable & (members > 0)
    out[ok] = total[ok] / members[ok]
    return out


def unit_flops(gm: torch.fx.GraphModule, c: Coupling) -> np.ndarray:
    """FLOPs saved by removing each prunable unit alone (0 for the others).

    Units that occupy the same spaces with the same index counts save the same FLOPs, so one
    count per distinct signature is enough (a handful per coupling group).
    """
    from .ops import count_flops, new_shape

    full = count_flops(gm)
    out = np.zeros(c.n_units)
    per = unit_space_counts(c)
    done: dict[tuple, float] = {}
    for u in np.nonzero(c.prunable)[0]:
        sig = tuple(sorted(per[u]))
        if sig not in done:
            removed = np.zeros(c.n_units, dtype=bool)
            removed[u] = True
            done[sig] = full - count_flops(gm, lambda n: new_shape(n, c, removed))
        out[u] = done[sig]
    return out


def summed_units(gm: torch.fx.GraphModule, c: Coupling) -> np.ndarray:
    """``bool[n_units]``: channels of a residual stream: written by two or more layers and added.

    A layer *writes* unit ``u`` when ``u`` is in its weight's output dimension but not in its
    weight's input dimension (a depthwise or grouped convolution carries its input channels
    through and writes nothing new). A unit is summed when at least two layers write it and an
    op that adds its operands (``OpRule.sums``) adds two operands carrying it (a residual add).
    Removing such a channel removes it from every block of the stream at once, and the identity
    paths carrying it cannot be re-fit by compensation. (Attention heads are written by the q,
    k and v projections but multiplied, not added: they are not summed.)

    Example:
        >>> import torch, torchvision
        >>> from oba_fx.passes.pipeline import analyze_model
        >>> gm = analyze_model(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),))
        >>> c = gm.meta["oba.coupling"]
        >>> int((summed_units(gm, c) & c.prunable).sum())   # 64 + 128 + 256 + 512 stream channels
        960
    """
    from .ops import rule_for_node, tensor_spaces

    writers = np.zeros(c.n_units, dtype=np.int64)
    for (name, dim), s in c.param_spaces.items():
        if dim != 0 or (name, 1) not in c.param_spaces:
            continue
        inp = set(c.units_of(c.param_spaces[(name, 1)]).tolist())
        out = np.unique(c.units_of(s))
        writers[[u for u in out.tolist() if u not in inp]] += 1
    added = np.zeros(c.n_units, dtype=bool)
    for node in gm.graph.nodes:
        rule = rule_for_node(gm, node) if node.op in ("call_function", "call_method") else None
        if rule is None or not rule.sums:
            continue
        counts = np.zeros(c.n_units, dtype=np.int64)
        for a in node.all_input_nodes:
            for s in tensor_spaces(a).spaces:
                counts[np.unique(c.units_of(s))] += 1
        added |= counts >= 2
    return (writers >= 2) & added


def unit_space_counts(c: Coupling) -> list[list[tuple[int, int]]]:
    """For each unit, ``[(space id, number of its indices in that space), ...]``."""
    per: list[list[tuple[int, int]]] = [[] for _ in range(c.n_units)]
    for s in c.spaces:
        u, n = np.unique(c.units_of(s), return_counts=True)
        for a, b in zip(u.tolist(), n.tolist()):
            per[a].append((s.id, b))
    return per


def order_with_caps(scores: np.ndarray, unit_spaces: list[list[tuple[int, int]]],
                    space_sizes: np.ndarray, cap: np.ndarray, min_keep: int = 1) -> np.ndarray:
    """Units in the order they may be removed: ascending score, skipping a unit whose removal
    would take some space beyond its cap (``cap[space]``, a fraction) or below ``min_keep``
    indices."""
    removed_count = np.zeros(len(space_sizes), dtype=np.int64)
    keep = np.minimum(space_sizes, max(min_keep, 1))
    limit = np.minimum(np.floor(cap * space_sizes), space_sizes - keep).astype(np.int64)
    out = []
    cand = np.nonzero(~np.isnan(scores))[0]
    for u in cand[np.argsort(scores[cand], kind="stable")]:
        sp = unit_spaces[u]
        if all(removed_count[s] + n <= limit[s] for s, n in sp):
            for s, n in sp:
                removed_count[s] += n
            out.append(int(u))
    return np.asarray(out, dtype=np.int64)


def apply_round_to(removed: np.ndarray, order: np.ndarray, c: Coupling, round_to: int) -> np.ndarray:
    """Give back removed units, last-removed first, until every layer that loses channels keeps a
    multiple of ``round_to`` of them.

    "Every layer" is every primary space (a layer's own channel dimension). Giving a unit back
    can change another layer's count, so the rounds repeat until all are multiples; a layer
    whose full size is no multiple of ``round_to`` can end whole (nothing removed), and a unit
    that spans several indices of a space (a group of a grouped convolution) moves its count by
    that many, so a multiple is not always reachable: then the layer keeps the next count above.
    """
    if round_to <= 1:
        return removed
    removed = removed.copy()
    rank = np.full(c.n_units, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    spaces = [s for s in c.primary_spaces() if c.prunable[c.units_of(s)].any()]
    changed = True
    while changed:
        changed = False
        for s in spaces:
            u = c.units_of(s)
            gone = removed[u]
            kept = int((~gone).sum())
            if kept == s.size or kept % round_to == 0:
                continue
            units, counts = np.unique(u[gone], return_counts=True)
            for i in np.argsort(-rank[units], kind="stable"):
                removed[units[i]] = False
                kept += int(counts[i])
                changed = True
                if kept == s.size or kept % round_to == 0:
                    break
    return removed


def choose(order: np.ndarray, n_units: int, measure: Callable[[np.ndarray], float], target: float,
           finalize: Callable[[np.ndarray], np.ndarray] = lambda r: r) -> np.ndarray:
    """Smallest prefix of ``order`` whose removal brings ``measure`` to ``target`` or below
    (binary search; ``measure`` falls as more units go). Raises ``ValueError`` if none does."""

    def mask(k: int) -> np.ndarray:
        m = np.zeros(n_units, dtype=bool)
        m[order[:k]] = True
        return finalize(m)

    if measure(mask(len(order))) > target:
        best = measure(mask(len(order)))
        raise BadInputError(
            f"target unreachable: removing every removable unit ({len(order)}) still leaves "
            f"{best:.4g} > target {target:.4g}. Ways out: a larger target, a higher max_layer_ratio, "
            "fewer ignored modules, or look at compiled.meta['oba']['barriers'] for ops that block pruning"
        )
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(mask(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return mask(lo)


@dataclass(frozen=True)
class Target:
    """What to reach.

    Attributes:
        kind: ``"flops"`` / ``"params"`` (retained fraction in (0, 1]) or ``"channels"``
            (fraction of prunable units removed, in [0, 1)).
        value: the fraction.
        max_layer_ratio: the most any one layer (any space) may lose, a fraction in (0, 1).
        round_to: kept units per coupling group rounded to a multiple of this.
        min_channels: every layer (every space) keeps at least this many indices.
        ranking: ``"group_max"``, ``"per_flop"`` or ``"global"`` (see :func:`unit_scores`).
        keep_summed: never remove a *summed* unit (:func:`summed_units`: a channel written by
            several layers and added up, such as a residual stream).
    """

    kind: str
    value: float
    max_layer_ratio: float = 0.95
    round_to: int = 1
    min_channels: int = 1
    ranking: str = "group_max"
    keep_summed: bool = False

    def __post_init__(self) -> None:
        if self.ranking not in RANKINGS:
            raise BadInputError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.kind not in ("flops", "params", "channels"):
            raise BadInputError(f"target kind must be 'flops', 'params' or 'channels', got {self.kind!r}")
        v = self.value
        if self.kind == "channels" and not 0.0 <= v < 1.0:
            raise BadInputError(f"channel_ratio is the fraction of prunable channels removed and must be in [0, 1), got {v}")
        if self.kind != "channels" and not 0.0 < v <= 1.0:
            raise BadInputError(f"target_{self.kind} is the retained fraction and must be in (0, 1], got {v}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise BadInputError(f"max_layer_ratio must be in (0, 1), got {self.max_layer_ratio}")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise BadInputError(f"round_to must be a positive integer, got {self.round_to}")


def count_params(gm: torch.nn.Module, c: Coupling, removed: np.ndarray | None = None) -> int:
    """Parameters of ``gm`` after removing ``removed`` units (all parameters when ``None``)."""
    total = 0
    for name, p in gm.named_parameters():
        shape = list(p.shape)
        if removed is not None:
            for d in range(len(shape)):
                s = c.param_spaces.get((name, d))
                if s is not None:
                    shape[d] = int((~removed[c.units_of(s)]).sum())
        total += int(np.prod(shape))
    return total


def select(gm: torch.fx.GraphModule, c: Coupling, scores: Mapping[str, torch.Tensor], target: Target,
           max_units: int | None = None, absolute: float | None = None) -> Selection:
    """Choose the units to remove (lowest normalised score first) to meet ``target``.

    Args:
        max_units: remove at most this many units (one step of an iterative schedule); the
            target is then met if it can be, and otherwise all ``max_units`` go, without error.
        absolute: the FLOPs / parameter budget as an absolute number instead of
            ``target.value`` times the current count (iterative schedules measure against the
            original model).
    """
    from .ops import count_flops, new_shape

    cost = unit_flops(gm, c) if target.ranking == "per_flop" else None
    curvature = target.ranking == "curvature"  # keys from the ranked units only: the kept residual streams are not
    us = unit_scores(c, scores, "global" if curvature else target.ranking, cost)
    if target.keep_summed:
        us[summed_units(gm, c)] = np.nan
    if curvature:
        us = curvature_keys(c.group, us)
    sizes = np.array([s.size for s in c.spaces], dtype=np.int64)
    order = order_with_caps(us, unit_space_counts(c), sizes, np.full(len(sizes), target.max_layer_ratio),
                            target.min_channels)
    partial = max_units is not None
    if partial:
        order = order[:max_units]

    def flops(removed: np.ndarray) -> int:
        return count_flops(gm, lambda n: new_shape(n, c, removed))

    def finalize(removed: np.ndarray) -> np.ndarray:
        return apply_round_to(removed, order, c, int(target.round_to))

    n = c.n_units
    if target.kind == "channels":
        k = int(round(target.value * int(np.count_nonzero(~np.isnan(us))))) if max_units is None else len(order)
        if k > len(order):
            raise BadInputError(
                f"channel_ratio={target.value} asks for {k} channels but only {len(order)} can go under "
                f"max_layer_ratio={target.max_layer_ratio} and min_channels={target.min_channels}; lower the ratio, "
                "raise max_layer_ratio or lower min_channels")
        removed = finalize(np.isin(np.arange(n), order[:k]))
    else:
        measure = flops if target.kind == "flops" else (lambda r: count_params(gm, c, r))
        budget = absolute if absolute is not None else target.value * measure(np.zeros(n, bool))
        try:
            removed = choose(order, n, measure, budget, finalize)
        except ValueError:
            if not partial:
                raise
            removed = finalize(np.isin(np.arange(n), order))
    removed.setflags(write=False)
    log.info("selected %d of %d prunable units", int(removed.sum()), int(c.prunable.sum()))
    return Selection(removed, us, flops(removed), count_params(gm, c, removed))
