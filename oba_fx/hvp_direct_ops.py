"""Runtime pieces of the directly generated fused HVP program (:mod:`oba_fx.hvp_direct`).

Each function is one step of the forward-over-reverse product with ``v = θ`` (``docs/design.md``
"The fused HVP"): convolution and linear input- and weight-gradients, per-channel reductions and
broadcasts, BatchNorm's normalised input, and closures that give the tangent and the pullback of
an op that is linear or piecewise linear in its input. The generated program calls them by name;
they are plain tensor functions.

Example:
    >>> import torch
    >>> g, x = torch.ones(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    >>> channel_sum(g).tolist()
    [32.0, 32.0, 32.0]
    >>> per_channel(torch.tensor([1., 2., 3.]), x).shape
    torch.Size([1, 3, 1, 1])
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

aten = torch.ops.aten


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` (one entry per channel, dim 1 of ``like``) shaped to broadcast against ``like``."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2))) if like.dim() > 1 else v


def channel_sum(g: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the channel dim 1 (the gradient of a per-channel bias)."""
    return g.sum(dim=[d for d in range(g.dim()) if d != 1]) if g.dim() > 1 else g


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where ``None`` is an exact zero."""
    if a is None:
        return b
    return a if b is None else a + b


def sub_bias(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y − b`` per channel (a layer's output without its bias)."""
    return y - per_channel(b, y)


def bias_like(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b`` per channel, broadcast to ``y``'s shape."""
    return per_channel(b, y).expand_as(y)


def conv_input_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``convᵀ(g, w)``: the input-gradient of a convolution (``x`` gives only the shape)."""
    zeros = [0] * (w.dim() - 2)
    return aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, zeros, groups,
                                     [True, False, False])[0]


def conv_weight_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """The weight-gradient of a convolution of ``x`` with output gradient ``g``."""
    zeros = [0] * (w.dim() - 2)
    return aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, zeros, groups,
                                     [False, True, False])[1]


def linear_weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ gᵀ x`` over every leading dim (the weight-gradient of ``F.linear``)."""
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def linear_bias_grad(g: torch.Tensor) -> torch.Tensor:
    """``Σ g`` over every leading dim."""
    return g.reshape(-1, g.shape[-1]).sum(0)


def unbroadcast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` summed down to ``like``'s shape (the pullback of broadcasting)."""
    return g if g.shape == like.shape else g.sum_to_size(like.shape)


def expand_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` broadcast to ``like``'s shape (the tangent of a sum with a broadcast operand)."""
    return t if t.shape == like.shape else t.expand_as(like)


def inv_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / √(var + eps)``."""
    return torch.rsqrt(var + eps)


def normalised(x: torch.Tensor, mean: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(x − mean) · r`` per channel (BatchNorm's ``x̂`` with running statistics)."""
    return (x - per_channel(mean, x)) * per_channel(r, x)


def scale(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``t · s`` per channel."""
    return t * per_channel(s, t)


def scale_add(t: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``t · s + a`` per channel ``s``, in one kernel."""
    return torch.addcmul(a, t, per_channel(s, t))


def bn_weight_hvp(g: torch.Tensor, dg: torch.Tensor | None, x: torch.Tensor, xdot: torch.Tensor | None,
                  mean: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``Σ (Ȳ̇ x̂ + Ȳ Ẋ r)`` per channel with ``x̂ = (X − μ) r``, as ``r Σ (Ȳ̇ (X − μ) + Ȳ Ẋ)``
    (the per-channel ``r`` taken out of the sum; ``None`` is an exact zero, not both).

    Example:
        >>> g, dg, x, xd = (torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(4))
        >>> mu, r = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
        >>> ref = channel_sum(dg * normalised(x, mu, r) + g * scale(xd, r))
        >>> torch.allclose(bn_weight_hvp(g, dg, x, xd, mu, r), ref)
        True
    """
    acc = None if dg is None else dg * (x - per_channel(mean, x))
    if xdot is not None:
        acc = g * xdot if acc is None else acc.addcmul_(g, xdot)
    return channel_sum(acc) * r


def relu_mask(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``g`` where ``y > 0``, else 0 (ReLU's tangent and pullback)."""
    return aten.threshold_backward(g, y, 0)


def linear_op(op: Callable) -> Callable:
    """``f(t, *rest, **kw) = op(t, ...)``: the tangent of an op linear in its first input."""
    def tangent(t: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
        return op(t, *rest, **kw)
    tangent.__name__ = f"tangent_{getattr(op, '__name__', 'op')}"
    return tangent


def piecewise_jvp(op: Callable) -> Callable:
    """``f(x, ẋ, *rest) = J ẋ`` for an op piecewise linear in ``x`` (max-pooling)."""
    def tangent(x: torch.Tensor, xdot: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
        return torch.func.jvp(lambda t: op(t, *rest, **kw), (x,), (xdot,))[1]
    tangent.__name__ = f"jvp_{getattr(op, '__name__', 'op')}"
    return tangent


def pullback(op: Callable) -> Callable:
    """``f(x, g, dg, *rest) = (Jᵀ g, Jᵀ dg)`` for an op (piecewise) linear in ``x``: its second
    derivative is zero, so the tangent of the pullback is the pullback of the tangent."""
    def vjp(x: torch.Tensor, g: torch.Tensor, dg: torch.Tensor | None, *rest: Any, **kw: Any):
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            out = op(xr, *rest, **kw)
            (gx,) = torch.autograd.grad(out, xr, g, retain_graph=dg is not None)
            dgx = None if dg is None else torch.autograd.grad(out, xr, dg)[0]
        return gx, dgx
    vjp.__name__ = f"vjp_{getattr(op, '__name__', 'op')}"
    return vjp


def loss_head(loss_fn: Callable, full: bool) -> Callable:
    """``f(z, ż, y) = (ℓ, c, ċ)``: the loss, ``c = ∂ℓ/∂z`` and its tangent (``∇²_z ℓ ż`` for the
    full Hessian, ``None`` for the functional one, where ``c`` is held fixed)."""
    def head(z: torch.Tensor, zdot: torch.Tensor | None, y: Any):
        with torch.enable_grad():
            logits = z.detach().requires_grad_()
            loss = loss_fn(logits, y)
            (c,) = torch.autograd.grad(loss, logits, create_graph=full)
            dc = None
            if full:
                t = torch.zeros_like(logits) if zdot is None else zdot
                dc = torch.autograd.grad(c, logits, t, allow_unused=True)[0]
                dc = torch.zeros_like(logits) if dc is None else dc.detach()
        return loss.detach(), c.detach(), dc
    head.__name__ = "loss_head"
    return head


def call_method(name: str) -> Callable:
    """``f(t, *a, **k) = t.<name>(*a, **k)``."""
    def method(t: torch.Tensor, *a: Any, **k: Any) -> Any:
        return getattr(t, name)(*a, **k)
    method.__name__ = f"method_{name}"
    return method


__all__ = ["per_channel", "channel_sum", "add", "conv_input_grad", "conv_weight_grad", "linear_weight_grad",
           "linear_bias_grad", "unbroadcast", "normalised", "relu_mask", "scale_add", "bn_weight_hvp", "pullback",
           "loss_head"]
