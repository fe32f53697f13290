"""Hessian block structure: ``gm.meta["oba.hessian_structure"]`` (a networkx graph)."""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.hessian_blocks import block_structure

from .base import OBAPass


class HessianStructurePass(OBAPass):
    """Series/parallel/self blocks of ``H_F`` (:func:`oba_fx.hessian_blocks.block_structure`).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
        >>> _ = HessianStructurePass()(gm)
        >>> list(gm.meta["oba.hessian_structure"].edges)
        [('0', '0')]
    """

    ENSURES = (M.HESSIAN_STRUCTURE,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        gm.meta[M.HESSIAN_STRUCTURE] = block_structure(gm)
        return PassResult(gm, False)
