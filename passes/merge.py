"""Cyclic pair merging between selection and slimming: ``gm.meta["oba.merged"]``."""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.merging import merge_structured

from .base import OBAPass


class MergePass(OBAPass):
    """Fold every removed unit's outgoing weights into a kept partner of its coupling group
    (:func:`oba_fx.merging.merge_structured`), in place on ``gm``'s parameters, so that slimming
    and the masked reference both start from the merged weights (verification then checks
    slimmed == merged-masked).

    Reads ``gm.meta["oba.coupling"]`` and ``gm.meta["oba.selection"]``; writes
    :class:`oba_fx.merging.MergeRecord`.

    Example:
        >>> import torch
        >>> from oba_fx.passes.pipeline import analyze_model
        >>> from oba_fx.passes.select import SelectPass
        >>> from oba_fx.select import Target
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> gm = analyze_model(m, (torch.randn(1, 2),))
        >>> gm.meta["oba.scores"] = {n: p.abs() for n, p in gm.named_parameters()}
        >>> _ = SelectPass(Target("channels", 0.5))(gm)
        >>> _ = MergePass("cyclic", 0.5)(gm)
        >>> len(gm.meta["oba.merged"].pairs)
        2
    """

    REQUIRES = (M.COUPLING, M.SELECTION)
    ENSURES = (M.MERGED,)

    def __init__(self, mode: str = "cyclic", fraction: float = 0.5) -> None:
        super().__init__()
        self.mode, self.fraction = mode, fraction

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        c, sel = gm.meta[M.COUPLING], gm.meta[M.SELECTION]
        gm.meta[M.MERGED] = merge_structured(gm, c, sel.removed, mode=self.mode, fraction=self.fraction)
        return PassResult(gm, True)
