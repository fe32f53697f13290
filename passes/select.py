"""Selection of the units to remove against a target: ``gm.meta["oba.selection"]``."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from oba_fx import meta as M
from oba_fx.select import Target, select


class SelectPass(PassBase):
    """Rank units by ``scores`` (per-parameter) and remove them until ``target`` is met
    (at most ``max_units``; ``absolute``: the budget as a number, see :func:`oba_fx.select.select`).

    Reads ``gm.meta["oba.coupling"]``; writes :class:`oba_fx.select.Selection`.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], target: Target, max_units: int | None = None,
                 absolute: float | None = None) -> None:
        super().__init__()
        self.scores, self.target, self.max_units, self.absolute = scores, target, max_units, absolute

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        c = M.graph_meta(gm, M.COUPLING)
        gm.meta[M.SELECTION] = select(gm, c, self.scores, self.target, self.max_units, self.absolute)
        return PassResult(gm, False)
