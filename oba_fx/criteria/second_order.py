"""The data-driven criteria: ``"oba"``, ``"taylor"``, ``"obd_fisher"``, ``"obd_hutchinson"``.

Each is ``fn(ctx, x, y) -> {name: per-parameter score}`` for one batch; :func:`oba_fx.score`
averages over batches (definitions in its docstring and in ``docs/design.md``).

Example:
    >>> import torch
    >>> from oba_fx.criteria.context import ScoreContext
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> s = oba(ScoreContext.for_model(m), torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
    >>> s["0.weight"].shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from typing import Any

import torch

from .context import ScoreContext


def oba(ctx: ScoreContext, x: Any, y: Any) -> dict[str, torch.Tensor]:
    """``θ ⊙ (H θ) + first_order · θ ⊙ g`` with ``H`` the functional or full Hessian."""
    with_grad = ctx.first_order != 0.0
    r = ctx.hvp(x, y, with_grad=with_grad)
    out = {}
    for n in ctx.names:
        s = ctx.params[n] * r.hvps[n]
        if with_grad:
            s = s + ctx.first_order * ctx.params[n] * r.grads[n]
        out[n] = s
    return out


def taylor(ctx: ScoreContext, x: Any, y: Any) -> dict[str, torch.Tensor]:
    """``θ ⊙ g``."""
    return {n: ctx.params[n] * g for n, g in ctx.gradient(x, y).items()}


def obd_fisher(ctx: ScoreContext, x: Any, y: Any) -> dict[str, torch.Tensor]:
    """``θ² ⊙ diag(F)``, ``F`` the empirical Fisher of the batch."""
    return {n: ctx.params[n].square() * d for n, d in ctx.fisher_diagonal(x, y).items()}


def obd_hutchinson(ctx: ScoreContext, x: Any, y: Any) -> dict[str, torch.Tensor]:
    """``θ² ⊙ d``, ``d`` the Hutchinson estimate of ``diag(H)``."""
    return {n: ctx.params[n].square() * d for n, d in ctx.hutchinson_diagonal(x, y).items()}
