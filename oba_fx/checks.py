"""Checks of what users hand in: finite weights, finite and non-empty batches, finite scores.

Each raises :class:`oba_fx.errors.BadInputError` naming the parameter or batch, what was
expected and a way out, before any result can silently become NaN.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = m.bias.fill_(float("inf"))
    >>> check_finite_model(m)
    Traceback (most recent call last):
    ...
    oba_fx.errors.BadInputError: parameter 'bias' has 2 non-finite (NaN/Inf) values; prune a model with finite \
weights (check the checkpoint you loaded)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .errors import BadInputError


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _non_finite(t: torch.Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite_model(model: nn.Module) -> None:
    """Every floating parameter and buffer of ``model`` is finite."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            n = _non_finite(t.detach())
            if n:
                raise BadInputError(f"{kind} {name!r} has {n} non-finite (NaN/Inf) values; prune a model with "
                                    "finite weights (check the checkpoint you loaded)")


def check_inputs_usable(inputs: Any, what: str) -> None:
    """The tensors of ``inputs`` are finite and none has an empty batch (first) dimension."""
    for t in _tensors(inputs):
        if t.dim() > 0 and t.shape[0] == 0:
            raise BadInputError(f"{what} has an empty batch (shape {tuple(t.shape)}); give at least one sample")
        n = _non_finite(t)
        if n:
            raise BadInputError(f"{what} has {n} non-finite (NaN/Inf) values; clean or normalise the data first")


def check_finite_scores(scores: Mapping[str, torch.Tensor], what: str) -> None:
    """Every score is finite (a NaN loss makes every second-order score NaN)."""
    for name, t in scores.items():
        n = _non_finite(t)
        if n:
            raise BadInputError(f"{what} gave {n} non-finite scores for parameter {name!r} (is the loss NaN or "
                                "infinite on it? check loss_fn and the targets)")
