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

import logging
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def take(data: Iterable, max_batches: int | None) -> Iterator:
    """The first ``max_batches`` items of ``data`` (all of them when ``None``); stops pulling
    from ``data`` as soon as that many were yielded."""
    if max_batches is not None and max_batches <= 0:
        return
    for i, batch in enumerate(data, 1):
        yield batch
        if max_batches is not None and i >= max_batches:
            return


def reusable(data: Any, max_batches: int | None) -> Any:
    """``data`` as it is if it can be iterated again; a one-shot iterator (a generator) read once
    into a list of its first ``max_batches`` batches (all of them when ``None``).

    Pruning reads the calibration data several times (the scores of each step, compensation,
    BatchNorm recalibration), each time through :func:`take` with the same ``max_batches``, so
    the list holds exactly what every pass would read. It holds it in memory at once: give a
    list or a DataLoader to avoid that.

    Example:
        >>> reusable((i for i in range(5)), 2)
        [0, 1]
        >>> reusable(range(3), 2)
        range(0, 3)
    """
    if not isinstance(data, Iterator):
        return data
    out = list(take(data, max_batches))
    log.info("data is a one-shot iterator (%s): read its %d batch(es) into a list to read them again",
             type(data).__name__, len(out))
    return out


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
