"""BatchNorm recalibration of a slimmed network: ``gm.meta["oba.bn_recalibrated"]``."""

from __future__ import annotations

from typing import Iterable

import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.bn import recalibrate_bn

from .base import OBAPass


class BNRecalibrationPass(OBAPass):
    """Re-estimate every BatchNorm's running statistics on the inputs of ``data``
    (:func:`oba_fx.bn.recalibrate_bn`); records whether any BatchNorm was recalibrated.

    It runs after verification: the slimmed network was checked against the masked original
    with the original statistics, and recalibration then changes only the slimmed network.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))
        >>> _ = BNRecalibrationPass([(torch.randn(8, 3, 4, 4), None)])(gm)
        >>> gm.meta["oba.bn_recalibrated"]
        True
    """

    ENSURES = (M.BN_RECALIBRATED,)

    def __init__(self, data: Iterable, max_batches: int | None = None) -> None:
        super().__init__()
        self.data, self.max_batches = data, max_batches

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
        if has_bn:
            recalibrate_bn(gm, self.data, self.max_batches)
        gm.meta[M.BN_RECALIBRATED] = has_bn
        return PassResult(gm, has_bn)
