"""Criteria: per-parameter scores, the first stage of per-parameter -> per-unit -> per-group.

A criterion maps a model (and, for data-driven criteria, calibration batches) to a dict
``{parameter name: tensor of that parameter's shape}``; :func:`oba_fx.select.unit_scores`
turns that into unit and group scores. Data-free criteria live here; the Hessian ones
("oba", "taylor", "obd_fisher", "obd_hutchinson") are computed by :func:`oba_fx.scoring.score`.

Example:
    >>> import torch
    >>> s = param_scores(torch.nn.Linear(2, 1), "l1")
    >>> sorted(s)
    ['bias', 'weight']
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

DATA_FREE = ("l1", "l2", "random")
HESSIAN = ("oba", "taylor", "obd_fisher", "obd_hutchinson")
CRITERIA = DATA_FREE + HESSIAN


def data_free_scores(model: nn.Module, criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """|θ| ("l1"), θ² ("l2") or seeded uniform noise ("random") for every parameter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().float().cpu()
        if criterion == "l1":
            out[name] = t.abs()
        elif criterion == "l2":
            out[name] = t.square()
        elif criterion == "random":
            out[name] = torch.rand(t.shape, generator=g)
        else:
            raise ValueError(f"unknown data-free criterion {criterion!r}; expected one of {DATA_FREE}")
    return out


def param_scores(model: nn.Module, criterion: str, data: Iterable | None = None, **kw: Any
                 ) -> dict[str, torch.Tensor]:
    """Per-parameter scores of ``model`` under ``criterion``.

    Args:
        model: the module whose ``named_parameters()`` are scored.
        criterion: one of :data:`CRITERIA`.
        data: calibration batches ``(x, y)``; required for the Hessian criteria.
        **kw: passed to :func:`oba_fx.scoring.score` (``hessian``, ``loss_fn``, ``max_batches``...).
    """
    if criterion in DATA_FREE:
        return data_free_scores(model, criterion, seed=kw.get("seed", 0))
    if criterion not in HESSIAN:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    if data is None:
        raise ValueError(
            f"criterion {criterion!r} needs calibration data: pass data=<iterable of (inputs, targets)>, "
            f"or use a data-free criterion ({', '.join(DATA_FREE)})")
    from .scoring import score  # heavy; imported on demand

    return score(model, data, criterion=criterion, **kw)
