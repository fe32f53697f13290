"""Comparing a slimmed network with its masked original.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> compare(m, m, (torch.randn(3, 2),))
    0.0
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import VerificationError
from .tracing import eval_mode


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def compare(model: torch.nn.Module, reference: torch.nn.Module, inputs: Sequence[Any], rtol: float = 1e-4) -> float:
    """Largest output difference relative to the reference's largest magnitude (eval mode).

    Raises:
        VerificationError: if it exceeds ``rtol`` or the output structures differ.
    """
    with eval_mode(model), eval_mode(reference):
        got, want = _flat(model(*inputs)), _flat(reference(*inputs))
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise VerificationError(
            f"output shapes differ: slimmed {[tuple(a.shape) for a in got]} vs masked original "
            f"{[tuple(b.shape) for b in want]}")
    worst = 0.0
    for a, b in zip(got, want):
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        rel = err / scale if scale > 0 else err
        worst = max(worst, rel)
    if worst > rtol:
        raise VerificationError(
            f"the slimmed network differs from the masked original by {worst:.3g} (relative, > {rtol:g}); "
            "this is a bug in an op rule: please report it with the model; meanwhile pass ignore=[...] "
            "for the modules around the failing layer or use verify=False at your own risk")
    return worst
