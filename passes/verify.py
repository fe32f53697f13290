"""Verification: the slimmed graph computes what the masked original computes."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.verify import compare

from .base import OBAPass


class VerifyPass(OBAPass):
    """Raise :class:`oba_fx.errors.VerificationError` if ``gm`` differs from ``reference``
    on ``example_inputs`` by more than ``rtol`` (relative to the reference's largest value);
    else record the relative error in ``gm.meta["oba.verified"]``."""

    ENSURES = (M.VERIFIED,)

    def __init__(self, reference: torch.nn.Module, example_inputs: Sequence[Any], rtol: float = 1e-4) -> None:
        super().__init__()
        self.reference, self.example_inputs, self.rtol = reference, tuple(example_inputs), rtol

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        gm.meta[M.VERIFIED] = compare(gm, self.reference, self.example_inputs, self.rtol)
        return PassResult(gm, False)
