"""Top-1 accuracy of a classifier over a loader.

Example:
    >>> import torch
    >>> evaluate(torch.nn.Identity(), [(torch.eye(3), torch.tensor([0, 1, 0]))])
    0.6666666666666666
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .batches import bar, length, module_device, take, to_device
from .distributed import is_main, shard, sum_numbers

logger = logging.getLogger(__name__)


def evaluate(model: nn.Module, loader, max_batches: int | None = None, progress: bool = False,
             desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` on ``loader``, as a fraction in [0, 1].

    Runs in eval mode under ``torch.no_grad()`` and restores the model's previous train/eval mode.
    Batches are moved to the device of the model's first parameter. Under ``torch.distributed``
    each rank evaluates its share of the batches (batch ``i`` on rank ``i mod world``) and the
    counts are summed, so every rank returns the accuracy over all of them (call it on every rank).

    Args:
        model: A classifier returning logits (N, C).
        loader: Iterable of ``(x, y)`` batches.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar over the batches (only on a terminal).
        desc: The bar's label.

    Returns:
        Correct predictions / images seen (0.0 if the loader is empty).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)); _ = model.bias.zero_()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]); y = torch.tensor([0, 1, 1])
        >>> evaluate(model, DataLoader(TensorDataset(x, y), batch_size=2))
        0.6666666666666666
    """
    device = module_device(model)
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    try:
        with torch.no_grad():
            for x, y in bar(shard(take(loader, max_batches)), progress and is_main(), desc,
                            total=length(loader, max_batches)):
                x, y = to_device(x, device), y.to(device, non_blocking=True)
                correct += (model(x).argmax(dim=1) == y).sum()  # stays on the device: no wait per batch
                total += y.numel()
    finally:
        model.train(was_training)
    hits, total = sum_numbers([int(correct), total])
    acc = hits / total if total else 0.0
    logger.info("top-1 %.4f on %d images", acc, int(total))
    return acc

