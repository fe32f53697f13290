"""Cyclic pair merging (CAMP-HiVe): a pruned weight or channel is folded into a kept partner.

**Unstructured** (:func:`merge_unstructured`, the paper's form). In each tensor, the pruned
entries ``P`` and the kept entries ``K`` are listed in flat (row-major) order; the ``i``-th pruned
entry's partner is ``K[i mod |K|]``. Every partner receives ``fraction`` (default ½) of the value
of each pruned entry mapped to it (sums when several map to one partner), then the pruned
entries are set to zero.

**Structured** (:func:`merge_structured`, our design on the coupling groups of
``docs/design.md`` "Coupling"). A removed unit ``r`` (a channel with everything coupled to it)
has *outgoing weights*: the input columns of every consumer layer that reads it (a conv with
``groups == 1`` or a linear along dim 1, a transposed conv with ``groups == 1`` along dim 0). Its
partner ``p`` is a kept unit of the same coupling group that occupies the same consumer columns;
each consumer gets ``W[:, p] += fraction · W[:, r]``. If ``r`` and ``p`` carried the same
activation, ``fraction = 1`` would leave the consumer's output unchanged; ½ hedges. Partners are
chosen ``"cyclic"`` (the ``i``-th removed unit of a group, in index order, gets the ``i mod |K|``-th
kept unit) or ``"similar"`` (the kept unit whose producer weights — the unit's entries in the
group's primary spaces, concatenated — have the largest cosine similarity). The removed columns
themselves are left for slimming to drop, so the slimmed network must equal the merged network
with the removed channels masked (``passes/verify.py`` checks exactly that when the merge runs
between selection and slimming).

Example:
    >>> w = torch.tensor([4.0, 1.0, 2.0, 8.0])
    >>> keep = torch.tensor([True, False, False, True])
    >>> merge_unstructured({"w": w}, {"w": keep})["w"].tolist()      # 1 -> 4, 2 -> 8
    [4.5, 0.0, 0.0, 9.0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from .spaces import Coupling, Space
from .errors import BadInputError

log = logging.getLogger(__name__)

#: how a removed unit's partner is chosen
PARTNER_MODES = ("cyclic", "similar")


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= float(fraction) <= 1.0:
        raise BadInputError(f"merge fraction must be in [0, 1] (the share of a pruned value added to its partner), "
                         f"got {fraction}")
    return float(fraction)


def cyclic_partners(pruned: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept[i mod len(kept)]`` for the ``i``-th entry of ``pruned``.

    Example:
        >>> cyclic_partners(torch.tensor([1, 2, 5]), torch.tensor([0, 3])).tolist()
        [0, 3, 0]
    """
    if kept.numel() == 0:
        raise BadInputError("no kept entry to merge into: a tensor was pruned completely")
    return kept[torch.arange(pruned.numel(), device=kept.device) % kept.numel()]


@torch.no_grad()
def merge_unstructured(weights: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor],
                       fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """Merged copies of ``weights``: each pruned entry's ``fraction`` added to its cyclic partner,
    then the pruned entries zeroed.

    Args:
        weights: ``{name: tensor}``.
        keep: ``{name: bool tensor of the same shape}`` (``True`` = kept); names without a mask
            are returned unchanged.
        fraction: share of a pruned value given to its partner.

    Returns:
        ``{name: merged tensor}`` (new tensors; the inputs are not modified).
    """
    fraction = _check_fraction(fraction)
    out = {}
    for n, w in weights.items():
        k = keep.get(n)
        if k is None:
            out[n] = w.clone()
            continue
        if tuple(k.shape) != tuple(w.shape):
            raise BadInputError(f"keep mask of {n!r} has shape {tuple(k.shape)}, the weight {tuple(w.shape)}")
        flat = w.detach().reshape(-1).clone()
        kf = k.reshape(-1).bool()
        pruned, kept = torch.nonzero(~kf).squeeze(1), torch.nonzero(kf).squeeze(1)
        if pruned.numel():
            partners = cyclic_partners(pruned, kept)
            flat.index_add_(0, partners, fraction * flat[pruned])
            flat[pruned] = 0.0
        out[n] = flat.view_as(w)
    return out


# ------------------------------------------------------------------------------ structured
@dataclass(frozen=True)
class MergeRecord:
    """What :func:`merge_structured` did (``gm.meta["oba.merged"]``).

    Attributes:
        mode: ``"cyclic"`` or ``"similar"``.
        fraction: share of a removed unit's outgoing weights added to its partner.
        pairs: ``(removed unit, partner unit)`` for every removed unit that was merged.
        columns: consumer parameter dims that received merged columns, as ``"name:dim"``.
        unmatched: removed units with outgoing weights but no kept partner in their group.
    """

    mode: str
    fraction: float
    pairs: tuple[tuple[int, int], ...]
    columns: tuple[str, ...]
    unmatched: tuple[int, ...]

    def summary(self) -> dict:
        """JSON-ready counts for the report."""
        return {"mode": self.mode, "fraction": self.fraction, "pairs": len(self.pairs),
                "consumer_dims": len(self.columns), "unmatched": len(self.unmatched)}


def _consumer_dim(module: nn.Module, attr: str) -> int | None:
    """The input-channel dim of a consumer weight (``None`` when the parameter is not one)."""
    if attr != "weight":
        return None
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return 0 if module.transposed else 1
    return None


def consumer_spaces(model: nn.Module, c: Coupling) -> list[Space]:
    """The parameter spaces that are consumers' input columns (see the module docstring)."""
    out = []
    for (name, dim), s in c.param_spaces.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            continue
        if _consumer_dim(mod, attr) == dim:
            out.append(s)
    return out


def _producer_features(model: nn.Module, c: Coupling, units: np.ndarray) -> dict[int, torch.Tensor]:
    """For ``"similar"``: each unit's entries in every primary space, flattened and concatenated."""
    params = dict(model.named_parameters())
    feats: dict[int, list[torch.Tensor]] = {int(u): [] for u in units}
    for s in c.primary_spaces():
        p = params.get(s.owner)
        if p is None:
            continue
        uos = c.units_of(s)
        for u in feats:
            idx = np.nonzero(uos == u)[0]
            if idx.size:
                feats[u].append(p.detach().index_select(s.dim, torch.as_tensor(idx)).double().reshape(-1))
    return {u: torch.cat(f) if f else torch.zeros(0, dtype=torch.float64) for u, f in feats.items()}


def _similar_partner(r: int, kept: list[int], feats: dict[int, torch.Tensor]) -> int:
    fr = feats[r]
    best, best_sim = kept[0], -float("inf")
    for p in kept:
        fp = feats[p]
        if fp.shape != fr.shape or fr.numel() == 0:
            continue
        sim = float(fr @ fp / (fr.norm() * fp.norm()).clamp_min(1e-30))
        if sim > best_sim:
            best, best_sim = p, sim
    return best


def structured_partners(model: nn.Module, c: Coupling, removed: np.ndarray, mode: str = "cyclic"
                        ) -> tuple[dict[int, int], list[int]]:
    """``{removed unit: kept partner}`` within coupling groups, and the removed units left without one.

    Only units that own consumer columns are paired; candidates are the group's kept units with
    consumer columns, in unit order.
    """
    if mode not in PARTNER_MODES:
        raise BadInputError(f"unknown partner mode {mode!r}; expected one of {PARTNER_MODES}")
    spaces = consumer_spaces(model, c)
    has_cols = np.zeros(c.n_units, dtype=bool)
    for s in spaces:
        has_cols[c.units_of(s)] = True
    pairs: dict[int, int] = {}
    unmatched: list[int] = []
    gone = np.nonzero(removed & has_cols)[0]
    feats = _producer_features(model, c, np.nonzero(has_cols)[0]) if mode == "similar" and gone.size else {}
    for g in np.unique(c.group[gone]):
        in_g = c.group == g
        rem = np.nonzero(in_g & removed & has_cols)[0].tolist()
        kept = np.nonzero(in_g & ~removed & has_cols)[0].tolist()
        if not kept:
            unmatched.extend(rem)
            continue
        for i, r in enumerate(rem):
            pairs[r] = kept[i % len(kept)] if mode == "cyclic" else _similar_partner(r, kept, feats)
    return pairs, unmatched


@torch.no_grad()
def merge_structured(model: nn.Module, c: Coupling, removed: np.ndarray, *, mode: str = "cyclic",
                     fraction: float = 0.5) -> MergeRecord:
    """Fold each removed unit's outgoing weights into its partner's, **in place** on ``model``.

    Args:
        model: the analysed module (its parameter names are those of ``c``).
        c: its coupling (``gm.meta["oba.coupling"]``).
        removed: ``bool[n_units]``, the selection.
        mode: ``"cyclic"`` or ``"similar"``.
        fraction: share added to the partner.

    Returns:
        :class:`MergeRecord`.
    """
    fraction = _check_fraction(fraction)
    pairs, unmatched = structured_partners(model, c, np.asarray(removed, dtype=bool), mode)
    params = dict(model.named_parameters())
    touched = []
    for s in consumer_spaces(model, c):
        uos = c.units_of(s)
        w = params[s.owner]
        hit = False
        src_all, dst_all = [], []
        for r, p in pairs.items():
            src, dst = np.nonzero(uos == r)[0], np.nonzero(uos == p)[0]
            if src.size == 0:
                continue
            if src.size != dst.size:
                log.warning("merge: unit %d and its partner %d have %d and %d columns in %s dim %d; not merged there",
                            r, p, src.size, dst.size, s.owner, s.dim)
                continue
            src_all.append(src)
            dst_all.append(dst)
        if src_all:
            src_t = torch.as_tensor(np.concatenate(src_all), device=w.device)
            dst_t = torch.as_tensor(np.concatenate(dst_all), device=w.device)
            add = fraction * w.index_select(s.dim, src_t)  # read every source before writing
            w.index_add_(s.dim, dst_t, add)
            hit = True
        if hit:
            touched.append(f"{s.owner}:{s.dim}")
    if unmatched:
        log.warning("merge: %d removed units have no kept partner in their group (whole group removed?)",
                    len(unmatched))
    log.info("merged %d removed units into kept partners (%s, fraction %g) across %d consumer weights", len(pairs),
             mode, fraction, len(touched))
    return MergeRecord(mode, fraction, tuple(sorted(pairs.items())), tuple(touched), tuple(unmatched))


__all__ = ["merge_unstructured", "merge_structured", "structured_partners", "consumer_spaces", "cyclic_partners",
           "MergeRecord", "PARTNER_MODES"]
