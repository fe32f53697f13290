"""Fused loss, gradient and Hessian-vector product ``H θ`` in one dual forward and one backward.

This module is pure algorithm (it never imports ``oba_fx.passes``). Notation as in ``docs/design.md`` "The maths":
``θ`` the scored parameters, ``z`` the logits, ``ℓ(z)`` the loss of a batch,
``c = ∂ℓ/∂z``, ``J = ∂z/∂θ``, ``v`` the tangent (``v = θ`` for OBA).

**The computation.** One dual (primal + tangent) forward of the model gives ``z`` and
``ż = J v`` while reverse mode records; then one backward pulls ``c`` back to the parameters.
The backward runs on dual tensors, so it returns at once

* its primal, ``Jᵀ c = g`` (the gradient), and
* its tangent, ``d/dt [J(θ + t v)ᵀ c(t)]``: with ``c`` held fixed (``stopgrad(∂ℓ/∂z)``,
  ``hessian="functional"``) this is ``Σ_k c_k ∇²_θ z_k · v = H_F v``; with ``c`` carrying its own
  tangent ``∇²_z ℓ · ż`` (``hessian="full"``) the extra term is ``Jᵀ ∇²_z ℓ J v = H_GN v``, riding
  the same backward, and the result is ``H v``.

By symmetry of second derivatives this equals ``∇_θ ⟨stopgrad(c), ż⟩`` (+ ``∇_θ ⟨stopgrad(∇²_z ℓ ż),
z⟩``), the reverse-over-forward form (``docs/design.md`` "The fused HVP"), at the same cost. Per conv / linear layer
(counting convolutions; one gradient costs 1 forward + 2 backward = 3): eagerly, the dual forward
runs ``Y``, ``W ⋆ Ẋ`` and ``θ ⋆ X`` and the backward the input- and weight-gradients of the
primal and of their tangents: 9, i.e. 3× a gradient. The generated program (below) shares
``θ ⋆ X = Y`` and ``convᵀ(ȳ, θ) = convᵀ(ȳ, W)``: 7 (2.33×), or 6 (2.0×) without the gradient
as an output. The forward-over-reverse order is
used because, in torch 2.14.1, the *backward of a forward-mode tangent* is wrong for LayerNorm
and for BatchNorm in train mode (their tangent formulas treat the saved mean and inverse standard
deviation as constants), while the tangent of the backward is exact; the tests check every
toy model against dense double-backward Hessians. ``c`` and ``∇²_z ℓ ż`` come from the loss head
only (a ``grad`` and a ``jvp`` of ``grad`` of ``loss_fn`` at the logits), so any twice
differentiable ``loss_fn(logits, y)`` works. Scaled-dot-product attention runs its math kernel
(the fused CPU kernel has no second derivative).

**The generated program** (:mod:`oba_fx.hvp_program`): :func:`~oba_fx.hvp_program.build_hvp_program` traces the same computation in its
``torch.func`` form (``jvp`` of ``vjp``) with ``make_fx`` (functionalised; scored parameters,
other parameters, buffers, inputs and targets as explicit placeholders) into one aten-level
``torch.fx.GraphModule`` and simplifies it using that the tangent *is* ``θ``: aliases and
detaches are dropped, exact zeros are propagated (the input's zero tangent), and
common-subexpression elimination finds that the tangent ``conv(X, θ)`` is the primal
``conv(X, W)`` (``Ẏ = Y + W ⋆ Ẋ``, ``docs/design.md`` "The fused HVP") and that the backward's ``convᵀ(ȳ, θ)`` is the
primal input-gradient; dead code is removed (without ``with_grad`` the primal weight-gradients go
too). The program gives the eager numbers to round-off.

**Modes.** Whatever mode the module is in is what is differentiated: in eval mode BatchNorm's
running statistics are constants; in train mode the batch statistics are part of the function
(exact for that function). Buffers are always passed as copies, so running statistics are never
updated and the module is never mutated.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> r = fused_hvp(m, (x, y), hessian="full")
    >>> sorted(r.hvps) == sorted(n for n, _ in m.named_parameters())
    True
    >>> g = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), m[0].weight)[0]
    >>> torch.allclose(r.grads["0.weight"], g)
    True
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad_and_value, jvp, vjp
from oba_fx.errors import BadInputError, BadNameError, BadTypeError

log = logging.getLogger(__name__)

#: the Hessians :func:`fused_hvp` can multiply by
HESSIAN_MODES = ("functional", "full")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def default_loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the default ``loss_fn``."""
    return F.cross_entropy(logits, target)


def check_hessian(hessian: str) -> str:
    """Return ``hessian`` if it is one of :data:`HESSIAN_MODES`, else raise ``ValueError``.

    Example:
        >>> check_hessian("gauss_newton")
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadInputError: unknown hessian 'gauss_newton'; expected one of ('functional', 'full')
    """
    if hessian not in HESSIAN_MODES:
        raise BadInputError(f"unknown hessian {hessian!r}; expected one of {HESSIAN_MODES}")
    return hessian


def trainable_param_names(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters of ``model`` that require grad (the default set).

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> m.bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:
        ...
        >>> trainable_param_names(m)
        ['weight']
    """
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.requires_grad]


@dataclass(frozen=True)
class HVPResult:
    """What one fused pass returns.

    Attributes:
        loss: the batch loss ``ℓ(z)`` (a 0-d tensor, detached).
        grads: ``{name: g}`` for the scored parameters (empty when not requested).
        hvps: ``{name: (H v)}`` for the scored parameters, ``H`` per ``hessian``.
        hessian: ``"functional"`` or ``"full"``.
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    hvps: dict[str, torch.Tensor]
    hessian: str


# --------------------------------------------------------------------------------------------
# the fused computation: torch.func form (traced into the program) and autograd form (eager)
# --------------------------------------------------------------------------------------------


def split_state(model: nn.Module, names: Sequence[str]) -> tuple[dict, dict, dict]:
    """(scored params, other params, buffers) of ``model`` as plain detached tensors."""
    wanted = set(names)
    params = dict(model.named_parameters())
    missing = wanted - set(params)
    if missing:
        raise BadNameError(f"not parameters of the model: {sorted(missing)}")
    scored = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in wanted}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return scored, frozen, buffers


def math_attention():
    """Scaled-dot-product attention on its (twice differentiable) math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _model_call(model: nn.Module, frozen: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                x: Any) -> Callable[[dict], torch.Tensor]:
    def call(p: dict) -> torch.Tensor:
        bufs = {n: b.clone() for n, b in buffers.items()}  # train-mode BN updates only these copies
        out = functional_call(model, ({**frozen, **p}, bufs), (x,))
        if not isinstance(out, torch.Tensor):
            raise BadTypeError(f"the model must return a logits tensor, got {type(out).__name__}")
        return out
    return call


def fused_fn(model: nn.Module, loss_fn: LossFn, hessian: str) -> Callable:
    """``f(scored, tangents, frozen, buffers, x, y) -> (loss, grads, hvps)`` (dicts), all with
    ``torch.func`` (``jvp`` of ``vjp``), so that it can be functionalised and traced.

    ``tangents=None`` means ``v = θ`` (the scored parameters' own values).
    """
    full = hessian == "full"

    def fused(scored: dict, tangents: dict | None, frozen: dict, buffers: dict, x: Any, y: Any):
        call = _model_call(model, frozen, buffers, x)

        def backward(p: dict):
            z, pullback = vjp(call, p)
            c, loss = grad_and_value(lambda logits: loss_fn(logits, y))(z if full else z.detach())
            (g,) = pullback(c)
            return g, loss

        v = tangents if tangents is not None else {n: t.detach() for n, t in scored.items()}
        g, hv, loss = jvp(backward, (scored,), (v,), has_aux=True)
        return loss, g, hv

    return fused


def _fused_eager(model: nn.Module, names: Sequence[str], loss_fn: LossFn, hessian: str,
                 tangents: Mapping[str, torch.Tensor] | None, x: Any, y: Any):
    """The same computation with ``torch.autograd.forward_ad`` and ``torch.autograd.grad``
    (less dispatch overhead than the nested ``torch.func`` transforms in eager mode)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    frozen = {n: p for n, p in params.items() if n not in leaves}
    with torch.enable_grad(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(leaves[n], (tangents[n] if tangents is not None else params[n]).detach())
                 for n in names}
        z = _model_call(model, frozen, buffers, x)(duals)
        z_p, z_t = fwAD.unpack_dual(z)
        logits = z_p.detach().requires_grad_()
        loss = loss_fn(logits, y)
        (c,) = torch.autograd.grad(loss, logits, create_graph=hessian == "full")
        if hessian == "full":
            t = torch.zeros_like(z_p) if z_t is None else z_t.detach()
            (hz,) = torch.autograd.grad(c, logits, grad_outputs=t)
            c = fwAD.make_dual(c.detach(), hz)
        gs = _pull_back(z, list(leaves.values()), c)
        grads, hvps = {}, {}
        for n, g in zip(names, gs):
            primal, tangent = fwAD.unpack_dual(g) if g is not None else (None, None)
            grads[n] = torch.zeros_like(leaves[n]) if primal is None else primal.detach()
            hvps[n] = torch.zeros_like(leaves[n]) if tangent is None else tangent.detach()
    return loss.detach(), grads, hvps


def _pull_back(z: torch.Tensor, leaves: list[torch.Tensor], c: torch.Tensor):
    """``Jᵀ c`` on dual tensors. Some backward kernels (SiLU's, Mish's in torch 2.14.1) have no
    forward-mode formula; with ``create_graph`` autograd runs their differentiable
    decompositions instead (same numbers, more memory), so that is the fallback."""
    try:
        return torch.autograd.grad(z, leaves, grad_outputs=c, allow_unused=True, retain_graph=True)
    except NotImplementedError as e:
        if "forward AD" not in str(e):
            raise
        log.info("retrying the backward with create_graph=True (%s)", e)
        return torch.autograd.grad(z, leaves, grad_outputs=c, allow_unused=True, create_graph=True)


def fused_hvp(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
              loss_fn: LossFn | None = None, hessian: str = "functional",
              tangents: Mapping[str, torch.Tensor] | None = None) -> HVPResult:
    """Loss, gradient and ``H v`` of one batch in one dual forward and one backward (eager).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule`` returning logits; used in its current
            train/eval mode (see the module docstring) and never mutated.
        batch: ``(x, y)``; ``x`` is passed to the model, ``y`` to ``loss_fn``.
        param_names: the parameters ``θ`` (default :func:`trainable_param_names`). The others are
            constants, so the result is the ``θ`` block of the Hessian times ``v``.
        loss_fn: ``loss_fn(logits, y) -> scalar``; default mean cross-entropy. Must be twice
            differentiable in the logits when ``hessian="full"``.
        hessian: ``"functional"`` (``H_F v``, the network's own curvature weighted by ``∂ℓ/∂z``)
            or ``"full"`` (``H v``).
        tangents: ``{name: v}``; default ``v = θ`` (the OBA quantity).

    Returns:
        :class:`HVPResult`; a parameter the loss does not depend on gets zeros.

    Example:
        >>> m = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> r = fused_hvp(m, (x, y))            # a linear model has no functional curvature
        >>> float(r.hvps["weight"].abs().max())
        0.0
    """
    check_hessian(hessian)
    names = list(param_names) if param_names is not None else trainable_param_names(model)
    split_state(model, names)  # validates the names
    x, y = batch
    with math_attention():
        loss, grads, hvps = _fused_eager(model, names, loss_fn or default_loss_fn, hessian, tangents, x, y)
    return HVPResult(loss, grads, hvps, hessian)
