"""Selection of the units to remove against a target: ``gm.meta["oba.selection"]``."""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.select import Target, select

from .base import OBAPass


class SelectPass(OBAPass):
    """Rank units by the per-parameter scores of ``gm.meta["oba.scores"]`` and remove them until
    ``target`` is met (at most ``max_units``; ``absolute``: the budget as a number, see
    :func:`oba_fx.select.select`).

    Reads ``gm.meta["oba.coupling"]`` and ``gm.meta["oba.scores"]``; writes
    :class:`oba_fx.select.Selection`.
    """

    REQUIRES = (M.COUPLING, M.SCORES)
    ENSURES = (M.SELECTION,)

    def __init__(self, target: Target, max_units: int | None = None, absolute: float | None = None) -> None:
        super().__init__()
        self.target, self.max_units, self.absolute = target, max_units, absolute

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        c, scores = gm.meta[M.COUPLING], gm.meta[M.SCORES]
        gm.meta[M.SELECTION] = select(gm, c, scores, self.target, self.max_units, self.absolute)
        return PassResult(gm, False)
