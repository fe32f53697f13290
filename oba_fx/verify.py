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


def _check_same_non_finite(i: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """NaN / Inf must sit at the same places with the same values in both outputs."""
    if not (a.is_floating_point() or a.is_complex()):
        return
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    same = torch.equal(fa, fb) and torch.equal(torch.isnan(a), torch.isnan(b))
    if same:
        both_inf = ~fa & ~torch.isnan(a)
        same = torch.equal(a[both_inf], b[both_inf])
    if not same:
        raise VerificationError(
            f"output {i}: the slimmed network has {int((~fa).sum())} NaN/Inf values where the masked original has "
            f"{int((~fb).sum())} (at other places or of other values); check the model's weights and inputs for "
            "NaN/Inf, or report the model if they are finite")


def compare(model: torch.nn.Module, reference: torch.nn.Module, inputs: Sequence[Any], rtol: float = 1e-4) -> float:
    """Largest output difference relative to the reference's largest magnitude (eval mode).

    NaN and Inf must appear at the same places with the same values in both outputs; the
    difference is measured over the finite values.

    Raises:
        VerificationError: if it exceeds ``rtol``, the output structures differ, or the outputs'
            NaN/Inf differ.

    Example:
        >>> bad = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = bad.weight.fill_(float("nan"))
        >>> compare(torch.nn.Linear(2, 2), bad, (torch.randn(3, 2),))
        Traceback (most recent call last):
        ...
        oba_fx.errors.VerificationError: output 0: the slimmed network has 0 NaN/Inf values where the masked \
original has 6 (at other places or of other values); check the model's weights and inputs for NaN/Inf, or \
report the model if they are finite
    """
    with eval_mode(model), eval_mode(reference):
        got, want = _flat(model(*inputs)), _flat(reference(*inputs))
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise VerificationError(
            f"output shapes differ: slimmed {[tuple(a.shape) for a in got]} vs masked original "
            f"{[tuple(b.shape) for b in want]}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        _check_same_non_finite(i, a, b)
        fin = torch.isfinite(b) if b.is_floating_point() else torch.ones_like(b, dtype=torch.bool)
        a, b = a[fin], b[fin]
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        rel = err / scale if scale > 0 else err
        if rel != rel:  # NaN can only come from a bug here; never let it pass as "no error"
            raise VerificationError(f"output {i}: the comparison itself produced NaN")
        worst = max(worst, rel)
    if worst > rtol:
        raise VerificationError(
            f"the slimmed network differs from the masked original by {worst:.3g} (relative, > {rtol:g}); "
            "this is a bug in an op rule: please report it with the model; meanwhile pass ignore=[...] "
            "for the modules around the failing layer or use verify=False at your own risk")
    return worst
