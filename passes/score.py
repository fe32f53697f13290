"""Importance scores: ``gm.meta["oba.scores"]`` (per-parameter, from a registered criterion)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.scoring import score

from .base import OBAPass


class ScorePass(OBAPass):
    """Score every parameter of ``gm`` with ``criterion`` (:func:`oba_fx.score`).

    Args:
        criterion: a registered criterion (:mod:`oba_fx.criteria`).
        data: calibration batches ``(x, y)`` (data-driven criteria).
        **options: passed to :func:`oba_fx.score` (``hessian``, ``loss_fn``, ``max_batches``,
            ``seed``, ``progress``...).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 3))
        >>> _ = ScorePass("l1")(gm)
        >>> sorted(gm.meta["oba.scores"])
        ['bias', 'weight']
    """

    ENSURES = (M.SCORES,)

    def __init__(self, criterion: str, data: Iterable | None = None, **options: Any) -> None:
        super().__init__()
        self.criterion, self.data, self.options = criterion, data, options

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        s = score(gm, self.data, criterion=self.criterion, **self.options)
        gm.meta[M.SCORES] = MappingProxyType({n: t.detach() for n, t in s.items()})
        return PassResult(gm, False)
