"""Small helpers every loop over calibration or training batches uses: take at most N batches,
move a (nested) batch to a device, find a module's device.

Example:
    >>> list(take(iter([1, 2, 3]), 2))
    [1, 2]
    >>> import torch
    >>> to_device((torch.zeros(1), [torch.ones(1)], "label"), torch.device("cpu"))[2]
    'label'
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn


def take(data: Iterable, max_batches: int | None) -> Iterator:
    """The first ``max_batches`` items of ``data`` (all of them when ``None``); stops pulling
    from ``data`` as soon as that many were yielded."""
    if max_batches is not None and max_batches <= 0:
        return
    for i, batch in enumerate(data, 1):
        yield batch
        if max_batches is not None and i >= max_batches:
            return


def to_device(x: Any, device: torch.device | str) -> Any:
    """``x`` with every tensor in it (tuples, lists and dicts searched) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def length(data: Iterable, max_batches: int | None = None) -> int | None:
    """How many batches :func:`take` will yield, when ``data`` has a length (else ``max_batches``)."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def bar(it: Iterable, progress: bool, desc: str, total: int | None = None, unit: str = "batch") -> Iterable:
    """``it`` wrapped in a tqdm progress bar when ``progress`` (tqdm shows it only on a terminal)."""
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, disable=None, leave=False)


def inputs_of(batch: Any) -> Any:
    """The inputs of a batch: ``batch[0]`` of an ``(inputs, targets)`` pair, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def module_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer) of ``model``; CPU if it has none.

    Example:
        >>> module_device(torch.nn.ReLU())
        device(type='cpu')
    """
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
