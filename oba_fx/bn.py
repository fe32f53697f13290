"""BatchNorm recalibration: re-estimate running statistics after pruning (no labels needed).

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    >>> _ = recalibrate_bn(m, [(torch.randn(8, 3, 4, 4) + 5, None)])
    >>> bool(m[1].running_mean.abs().sum() > 0), m.training
    (True, False)
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .batches import bar, inputs_of, module_device, take, to_device
from .distributed import all_reduce_sum, is_main, shard, sum_number, world


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int | None = None,
                   progress: bool = False) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as the exact average
    over ``batches`` (``(inputs, targets)`` pairs or bare inputs). Modes are restored.

    Under ``torch.distributed`` each rank runs its share of the batches and the per-batch
    averages are combined over the ranks, so every rank ends with the statistics of all batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over batches
    model.train()
    try:
        device = module_device(model)
        n = 0
        for batch in bar(shard(take(batches, max_batches)), progress and is_main(), "BN recalibration"):
            model(to_device(inputs_of(batch), device))
            n += 1
        _combine_over_ranks(bns, n)
    finally:
        for bn, mom in saved:
            bn.momentum = mom
        for m, t in modes:
            m.training = t
    return model


def _combine_over_ranks(bns: list, n_local: int) -> None:
    """Each rank holds the mean of its batches' statistics; make it the mean over all batches."""
    if world() == 1:
        return
    n = sum_number(n_local)
    for bn in bns:
        for buf in (bn.running_mean, bn.running_var):
            buf.copy_(all_reduce_sum(buf.double() * n_local).div_(max(n, 1)).to(buf.dtype))
        bn.num_batches_tracked.fill_(int(n))
