"""Physical slimming: returns a new, smaller GraphModule (the input graph is unchanged)."""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.surgery import slim

from .base import OBAPass


class SlimPass(OBAPass):
    """Remove ``gm.meta["oba.selection"].removed`` units (:func:`oba_fx.surgery.slim`); returns a new,
    smaller GraphModule."""

    REQUIRES = (M.COUPLING, M.SELECTION)

    def __init__(self, example_inputs: Sequence[Any]) -> None:
        super().__init__()
        self.example_inputs = tuple(example_inputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        c, sel = gm.meta[M.COUPLING], gm.meta[M.SELECTION]
        return PassResult(slim(gm, c, sel.removed, self.example_inputs), True)
