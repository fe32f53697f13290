"""The data-free criteria: ``"l1"``, ``"l2"``, ``"random"`` (registered in :mod:`oba_fx.criteria`).

Example:
    >>> import torch
    >>> from oba_fx.criteria.context import ScoreContext
    >>> l1(ScoreContext.for_model(torch.nn.Linear(2, 1)))["weight"].shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import torch

from .context import ScoreContext


def l1(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """``|θ|``."""
    return {n: t.abs() for n, t in ctx.params.items()}


def l2(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """``θ²``."""
    return {n: t.square() for n, t in ctx.params.items()}


def random(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Uniform ``[0, 1)`` noise from ``torch.Generator().manual_seed(ctx.seed)``, drawn in float32 on
    the CPU in parameter order (the same numbers on every device), then cast."""
    g = torch.Generator().manual_seed(ctx.seed)
    out = {}
    for n, t in ctx.params.items():
        r = torch.rand(t.shape, generator=g)
        out[n] = r.to(dtype=t.dtype if t.is_floating_point() else torch.float32, device=t.device)
    return out
