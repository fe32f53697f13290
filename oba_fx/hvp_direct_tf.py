"""Transformer ops of the directly generated fused HVP program (:mod:`oba_fx.hvp_direct`):
LayerNorm, exact GELU and scaled-dot-product attention, written out by hand (faster than the
generic ``torch.func`` rule of :mod:`oba_fx.hvp_generic`; both are checked against dense
Hessians). ``None`` is an exact zero throughout; ``v = θ`` (``docs/design.md`` "The fused HVP").

* LayerNorm over the last ``k`` dims, ``x̂ = (X − μ) r``, ``Y = γ x̂ + β``. With
  ``N(u) = r (u − ⟨u⟩ − x̂ ⟨u x̂⟩)`` (``⟨·⟩`` the mean over the normalised dims; ``N`` is the
  symmetric Jacobian of ``x̂``): ``ẋ̂ = N(Ẋ)``, ``Ẏ = γ ẋ̂ + γ̇ x̂ + β̇``; ``u = γ Ȳ``, ``X̄ = N(u)``,
  ``Ẋ̄ = N(u̇) − r m X̄ − r (ẋ̂ ⟨u x̂⟩ + x̂ ⟨u ẋ̂⟩)`` with ``m = ⟨x̂ Ẋ⟩``, ``u̇ = γ Ȳ̇ + γ̇ Ȳ``;
  ``(Hθ)_γ = Σ (Ȳ̇ x̂ + Ȳ ẋ̂)``, ``(Hθ)_β = Σ Ȳ̇``.
* GELU ``f(x) = x Φ(x)``: ``f' = Φ + x φ``, ``f'' = φ (2 − x²)``; ``Ẏ = f' Ẋ``, ``X̄ = f' Ȳ``,
  ``Ẋ̄ = f' Ȳ̇ + f'' Ẋ Ȳ``.
* attention ``S = s Q Kᵀ + M``, ``A = softmax(S)``, ``O = A V``: with
  ``D(A, Z) = A ⊙ (Z − rowsum(A ⊙ Z))`` (softmax's Jacobian, symmetric), ``Ȧ = D(A, Ṡ)``,
  ``Ȯ = Ȧ V + A V̇``; ``Ā = Ō Vᵀ``, ``V̄ = Aᵀ Ō``, ``S̄ = D(A, Ā)``, ``Q̄ = s S̄ K``, ``K̄ = s S̄ᵀ Q``,
  and their tangents by the product rule (``Ṡ̄ = D(A, Ā̇) + Ȧ ⊙ (Ā − rowsum(A ⊙ Ā)) − A rowsum(Ȧ ⊙ Ā)``).

Example:
    >>> import torch
    >>> x, xd, g = (torch.randn(2, 5, dtype=torch.float64) for _ in range(3))
    >>> y, yd, _, _ = gelu_forward(x, xd)
    >>> ref = torch.func.jvp(torch.nn.functional.gelu, (x,), (xd,))
    >>> torch.allclose(y, ref[0]) and torch.allclose(yd, ref[1])
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

_SQRT_2PI = math.sqrt(2 * math.pi)


def _add(*ts: Any) -> Any:
    out = None
    for t in ts:
        if t is not None:
            out = t if out is None else out + t
    return out


def _mul(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a * b


# ------------------------------------------------------------------------------- LayerNorm
def _mean(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.mean(dim=tuple(range(-k, 0)), keepdim=True)


def _lead_sum(t: Any, k: int) -> Any:
    return None if t is None else t.reshape(-1, *t.shape[t.dim() - k:]).sum(0)


def _project(u: torch.Tensor, xhat: torch.Tensor, r: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N(u), ⟨u x̂⟩)``."""
    ux = _mean(u * xhat, k)
    return r * (u - _mean(u, k) - xhat * ux), ux


def layer_norm_forward(x: torch.Tensor, xdot: Any, w: Any, b: Any, w_scored: bool, b_scored: bool, k: int,
                       eps: float) -> tuple:
    """``(Y, Ẏ, x̂, r, ẋ̂, m)`` of LayerNorm over the last ``k`` dims (module docstring)."""
    mu = _mean(x, k)
    xc = x - mu
    r = torch.rsqrt(_mean(xc * xc, k) + eps)
    xhat = xc * r
    y = xhat if w is None else xhat * w
    y = y if b is None else y + b
    xhat_dot = m = None
    if xdot is not None:
        m = _mean(xhat * xdot, k)
        xhat_dot = r * (xdot - _mean(xdot, k) - xhat * m)
    theta = _add(xhat * w if w_scored else None, b.expand_as(y) if b_scored else None)
    if w_scored and (b is None or b_scored):
        theta = y
    ydot = _add(xhat_dot if w is None or xhat_dot is None else xhat_dot * w, theta)
    return y, ydot, xhat, r, xhat_dot, m


def layer_norm_backward(g: torch.Tensor, dg: Any, xhat: torch.Tensor, r: torch.Tensor, xhat_dot: Any, m: Any,
                        w: Any, w_scored: bool, k: int, need_x: bool) -> tuple:
    """``(X̄, Ẋ̄, γ̄, (Hθ)_γ, β̄, (Hθ)_β)`` of LayerNorm (``X̄, Ẋ̄`` only when ``need_x``)."""
    xbar = xdbar = None
    if need_x:
        u = g if w is None else g * w
        xbar, ux = _project(u, xhat, r, k)
        udot = _add(None if dg is None else (dg if w is None else dg * w), g * w if w_scored else None)
        xdbar = None if udot is None else _project(udot, xhat, r, k)[0]
        if xhat_dot is not None:
            xdbar = _add(xdbar, -(r * m) * xbar - r * (xhat_dot * ux + xhat * _mean(u * xhat_dot, k)))
    gbar = _lead_sum(g * xhat, k)
    gdbar = _lead_sum(_add(_mul(dg, xhat), _mul(g, xhat_dot)), k)
    return xbar, xdbar, gbar, gdbar, _lead_sum(g, k), _lead_sum(dg, k)


# ------------------------------------------------------------------------------------ GELU
def _gelu_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    phi = torch.exp(-0.5 * x * x) / _SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * phi, phi * (2 - x * x)


def gelu_forward(x: torch.Tensor, xdot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gelu(x), f'(x) ẋ, f', f'')`` (exact GELU; the derivatives are kept for the backward)."""
    d1, d2 = _gelu_derivatives(x)
    return torch.nn.functional.gelu(x), d1 * xdot, d1, d2


def gelu_backward(d1: torch.Tensor, d2: torch.Tensor, xdot: torch.Tensor, g: torch.Tensor,
                  dg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f' Ȳ, f' Ȳ̇ + f'' Ẋ Ȳ)``."""
    return d1 * g, _add(_mul(d1, dg), d2 * xdot * g)


# ------------------------------------------------------------------------------- attention
def _softmax_jvp(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    az = a * z
    return az - a * az.sum(-1, keepdim=True)


def _mm(a: Any, b: Any) -> Any:
    return None if a is None or b is None else a @ b


def _t(a: Any) -> Any:
    return None if a is None else a.transpose(-2, -1)


def attention_forward(q, k, v, qd, kd, vd, mask: Any, scale: float | None) -> tuple:
    """``(O, Ȯ, A, Ȧ, s)``: scaled-dot-product attention (additive float ``mask`` or ``None``)."""
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise RuntimeError(f"attention with broadcast batch dims {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}: "
                           "the direct HVP program's attention rule needs equal ones")
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * s
    if mask is not None:
        scores = scores + (mask if mask.dtype != torch.bool else
                           torch.zeros_like(scores).masked_fill(~mask, float("-inf")))
    a = torch.softmax(scores, dim=-1)
    out = a @ v
    sdot = _add(_mm(qd, _t(k)), _mm(q, _t(kd)))
    adot = None if sdot is None else _softmax_jvp(a, sdot * s)
    return out, _add(_mm(adot, v), _mm(a, vd)), a, adot, s


def attention_backward(q, k, v, qd, kd, vd, a, adot, s: float, g, dg, need: tuple) -> tuple:
    """``(Q̄, K̄, V̄)`` and their tangents ``(Q̄̇, K̄̇, V̄̇)`` for ``Ō = g``, ``Ō̇ = dg``; ``need`` says
    which of q, k, v carry a tangent (the others get ``None``)."""
    abar = g @ v.transpose(-2, -1)
    abar_dot = _add(_mm(dg, _t(v)), _mm(g, _t(vd)))
    vbar = vdbar = None
    if need[2]:
        vbar = a.transpose(-2, -1) @ g
        vdbar = _add(_mm(_t(adot), g), _mm(_t(a), dg))
    qbar = kbar = qdbar = kdbar = None
    if need[0] or need[1]:
        sbar = _softmax_jvp(a, abar) * s
        parts = [None if abar_dot is None else _softmax_jvp(a, abar_dot)]
        if adot is not None:
            parts += [adot * (abar - (a * abar).sum(-1, keepdim=True)), -a * (adot * abar).sum(-1, keepdim=True)]
        sbar_dot = _add(*parts)
        sbar_dot = None if sbar_dot is None else sbar_dot * s
        if need[0]:
            qbar, qdbar = sbar @ k, _add(_mm(sbar_dot, k), _mm(sbar, kd))
        if need[1]:
            kbar, kdbar = _t(sbar) @ q, _add(_mm(_t(sbar_dot), q), _mm(_t(sbar), qd))
    return (qbar, kbar, vbar), (qdbar, kdbar, vdbar)


__all__ = ["layer_norm_forward", "layer_norm_backward", "gelu_forward", "gelu_backward", "attention_forward",
           "attention_backward"]
