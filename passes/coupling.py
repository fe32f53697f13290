"""Channel coupling: ``node.meta["oba.spaces"]`` and ``gm.meta["oba.coupling"]``."""

from __future__ import annotations

import logging
from typing import Iterable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.coupling import analyze

from .base import OBAPass

log = logging.getLogger(__name__)


class CouplingPass(OBAPass):
    """Element-level coupling (:func:`oba_fx.coupling.analyze`).

    Args:
        frozen_modules: qualified names of modules whose parameters must not change.
        norm_width: couple the channels LayerNorm / RMSNorm normalise (see
            :func:`oba_fx.coupling.analyze`).

    Example:
        >>> import torch
        >>> from oba_fx.passes import ShapePropPass
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)))
        >>> _ = ShapePropPass((torch.randn(1, 2),))(gm); _ = CouplingPass()(gm)
        >>> int(gm.meta["oba.coupling"].prunable.sum())
        4
    """

    ENSURES = (M.COUPLING,)

    def __init__(self, frozen_modules: Iterable[str] = (), norm_width: bool = False) -> None:
        super().__init__()
        self.frozen = tuple(frozen_modules)
        self.norm_width = norm_width

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        c = analyze(gm, frozen_modules=self.frozen, norm_width=self.norm_width)
        gm.meta[M.COUPLING] = c
        for b in c.barriers:
            log.info("barrier at %s (%s %s): %s", b.node, b.op, b.target, b.reason)
        log.info("coupling: %d units (%d prunable) in %d groups, %d barriers",
                 c.n_units, int(c.prunable.sum()), c.n_groups, len(c.barriers))
        return PassResult(gm, False)
