"""The generic rule of the directly generated fused HVP program (:mod:`oba_fx.hvp_direct`).

A node without a specific rule (LayerNorm, GELU, softmax, a product of two activations,
attention, a leaf module the tracer keeps whole, ...) is run as a function
``Y = f(X, θ_own)`` of its tensor inputs ``X`` and its own parameters, and differentiated
exactly with ``torch.func`` on that one op (``docs/design.md`` "The fused HVP"):

* forward: ``(Y, Ẏ) = jvp(f, (X, θ), (Ẋ, θ))`` (the scored parameters' tangent is their value,
  ``v = θ``; a frozen parameter or buffer is a constant);
* backward: the pullback ``(X̄, θ̄) = vjp(f)(Ȳ)`` and its tangent ``(Ẋ̄, (Hθ)_own)``, the ``jvp`` of
  ``(X, θ, Ȳ) ↦ vjp(f)(Ȳ)`` with tangents ``(Ẋ, θ, Ȳ̇)`` (forward over reverse, the order that is
  exact for LayerNorm in torch 2.14.1).

``None`` is an exact zero: an input without tangent is a constant, ``Ȳ̇ = None`` is left out of
the ``jvp``. Non-tensor arguments pass through unchanged. Outputs may be tuples (``chunk``, a
module returning several tensors); their adjoints are tuples with ``None`` for the unused parts.

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, dtype=torch.float64)
    >>> fn = NodeFn.build(torch.tanh, (x,), {}, active=[0])
    >>> y, ydot = fn.forward(fn.flat_values((x,), {}), [x], [], [])
    >>> torch.allclose(ydot, (1 - y ** 2) * x)
    True
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, jvp, vjp
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .hvp import math_attention


def add_tree(a: Any, b: Any) -> Any:
    """``a + b`` for tensors or tuples of them, ``None`` being an exact zero.

    Example:
        >>> add_tree((None, torch.ones(1)), (torch.ones(1), torch.ones(1)))
        (tensor([1.]), tensor([2.]))
    """
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, (tuple, list)):
        return tuple(add_tree(u, v) for u, v in zip(a, b))
    return a + b


def fill_zeros(g: Any, like: Any) -> Any:
    """``g`` with every ``None`` (an exact zero) replaced by zeros shaped like ``like``'s part;
    non-floating parts of ``like`` stay ``None``."""
    if isinstance(like, (tuple, list)):
        parts = g if isinstance(g, (tuple, list)) else [None] * len(like)
        return tuple(fill_zeros(u, v) for u, v in zip(parts, like))
    if g is not None or not isinstance(like, torch.Tensor) or not like.is_floating_point():
        return g
    return torch.zeros_like(like)


def _float_tangent(t: Any) -> Any:
    """The tangent of an output, ``None`` for an integer / boolean part (it has none)."""
    if isinstance(t, (tuple, list)):
        return tuple(_float_tangent(u) for u in t)
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None


@dataclass(frozen=True, eq=False)
class NodeFn:
    """One node as ``f(active inputs, scored own params)``, everything else held constant.

    Attributes:
        op: the function, method caller or module.
        spec: pytree spec of the node's ``(args, kwargs)``.
        active: positions, in the flattened ``(args, kwargs)``, of the inputs with a tangent.
        module: the module of a ``call_module`` node (run with ``functional_call``), else ``None``.
        scored: module-relative names of its scored parameters (tangent ``θ``).
        others: module-relative names of its other parameters and buffers (constants).
        attention: run under the math attention kernel (twice differentiable).
    """

    op: Callable
    spec: TreeSpec
    active: tuple[int, ...]
    module: nn.Module | None = None
    scored: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    attention: bool = False

    @classmethod
    def build(cls, op: Callable, args: Sequence, kwargs: dict, active: Sequence[int], **kw: Any) -> "NodeFn":
        """A NodeFn for ``op(*args, **kwargs)`` (``args`` may hold FX nodes: only the structure is kept)."""
        _, spec = tree_flatten((tuple(args), dict(kwargs)))
        return cls(op, spec, tuple(active), **kw)

    @staticmethod
    def flat_values(args: Sequence, kwargs: dict) -> list:
        """The flattened ``(args, kwargs)`` in the order of :attr:`spec`."""
        return tree_flatten((tuple(args), dict(kwargs)))[0]

    def context(self):
        return math_attention() if self.attention else contextlib.nullcontext()

    def run(self, flat: Sequence, act: Sequence, live: Sequence[int], scored: Sequence, others: Sequence) -> Any:
        """``op`` on ``flat`` with the inputs at ``live`` positions of :attr:`active` replaced by ``act``."""
        values = list(flat)
        for k, a in zip(live, act):
            values[self.active[k]] = a
        args, kwargs = tree_unflatten(values, self.spec)
        if self.module is None:
            return self.op(*args, **kwargs)
        state = dict(zip(self.scored, scored))
        state.update(zip(self.others, others))
        return functional_call(self.module, state, tuple(args), kwargs, strict=True)

    def _live(self, tangents: Sequence) -> tuple[int, ...]:
        """Active inputs whose tangent exists at run time (an integer part of a tuple has none)."""
        return tuple(k for k, t in enumerate(tangents) if t is not None)

    def value(self, flat: Sequence, others: Sequence, scored: Sequence = ()) -> Any:
        """The primal output only (no input carries a tangent)."""
        with self.context():
            return self.run(flat, (), (), scored, others)

    def forward(self, flat: Sequence, tangents: Sequence, scored: Sequence, others: Sequence) -> tuple[Any, Any]:
        """``(Y, Ẏ)``: the output and its tangent along ``(Ẋ, θ)``."""
        live = self._live(tangents)
        act = tuple(flat[self.active[k]] for k in live)
        tan = tuple(tangents[k] for k in live)

        def f(a: tuple, p: tuple) -> Any:
            return self.run(flat, a, live, p, others)
        with self.context():
            try:
                y, ydot = jvp(f, (act, tuple(scored)), (tan, tuple(scored)))
            except NotImplementedError as e:
                if "forward AD" not in str(e):
                    raise
                y, ydot = self._forward_by_reverse(f, act, tan, tuple(scored))
        return y, _float_tangent(ydot)

    def backward(self, flat: Sequence, tangents: Sequence, scored: Sequence, others: Sequence, y: Any, g: Any,
                 dg: Any) -> tuple[list, list, tuple, tuple]:
        """``(X̄, Ẋ̄, θ̄, (Hθ)_own)``: the pullback of ``Ȳ = g`` and its tangent along ``(Ẋ, θ, Ȳ̇ = dg)``;
        ``X̄`` and ``Ẋ̄`` have one entry per active input (``None`` where it had no tangent)."""
        live = self._live(tangents)
        act = tuple(flat[self.active[k]] for k in live)
        tan = tuple(tangents[k] for k in live)
        p = tuple(scored)
        g = fill_zeros(g, y)

        def pull(a: tuple, q: tuple, gg: Any) -> tuple:
            _, vjp_fn = vjp(lambda a_, q_: self.run(flat, a_, live, q_, others), a, q)
            return vjp_fn(gg)
        dg = None if dg is None else fill_zeros(dg, y)
        with self.context():
            try:
                if dg is None:
                    bars, dbars = jvp(lambda a, q: pull(a, q, g), (act, p), (tan, p))
                else:
                    bars, dbars = jvp(pull, (act, p, g), (tan, p, dg))
            except NotImplementedError as e:
                if "forward AD" not in str(e):
                    raise
                bars, dbars = self._backward_by_reverse(lambda a_, q_: self.run(flat, a_, live, q_, others),
                                                        act, tan, p, g, dg)
        xbar, xdbar = [None] * len(tangents), [None] * len(tangents)
        for j, k in enumerate(live):
            xbar[k], xdbar[k] = bars[0][j], dbars[0][j]
        return xbar, xdbar, bars[1], dbars[1]


    # -- the same numbers by reverse mode only, for ops without forward-AD formulas --------------
    @staticmethod
    def _forward_by_reverse(f: Callable, act: tuple, tan: tuple, p: tuple) -> tuple[Any, Any]:
        """``(Y, J (Ẋ, θ))`` with two backward passes (``Jv = ∂/∂u ⟨Jᵀ u, v⟩``)."""
        with torch.enable_grad():
            a, q = _leaves(act), _leaves(p)
            y = f(a, q)
            ys, spec = tree_flatten(y)
            idx = [i for i, t in enumerate(ys) if isinstance(t, torch.Tensor) and t.requires_grad]
            us = [torch.zeros_like(ys[i], requires_grad=True) for i in idx]
            gx = torch.autograd.grad([ys[i] for i in idx], a + q, us, create_graph=True, allow_unused=True)
            pairs = [(gi, v) for gi, v in zip(gx, tan + p) if gi is not None]
            jv = torch.autograd.grad([gi for gi, _ in pairs], us, [v for _, v in pairs], allow_unused=True)
        dots = [None] * len(ys)
        for i, d in zip(idx, jv):
            dots[i] = torch.zeros_like(ys[i]) if d is None else d.detach()
        return tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in ys], spec), \
            tree_unflatten(dots, spec)

    @staticmethod
    def _backward_by_reverse(f: Callable, act: tuple, tan: tuple, p: tuple, g: Any, dg: Any) -> tuple:
        """The pullback of ``g`` and its tangent by double backward: the tangent along
        ``(Ẋ, θ)`` is the Hessian of ``⟨g, f⟩`` times ``(Ẋ, θ)`` (symmetric), plus the pullback of ``dg``."""
        with torch.enable_grad():
            a, q = _leaves(act), _leaves(p)
            ys, _ = tree_flatten(f(a, q))
            gs, dgs = tree_flatten(g)[0], (tree_flatten(dg)[0] if dg is not None else None)
            idx = [i for i, t in enumerate(ys) if isinstance(t, torch.Tensor) and t.requires_grad and gs[i] is not None]
            leaves = a + q
            bar = torch.autograd.grad([ys[i] for i in idx], leaves, [gs[i] for i in idx], create_graph=True,
                                      allow_unused=True)
            live = [(b, v) for b, v in zip(bar, tan + p) if b is not None and b.requires_grad]
            hv = torch.autograd.grad([b for b, _ in live], leaves, [v for _, v in live], allow_unused=True,
                                     retain_graph=dgs is not None) if live else [None] * len(leaves)
            dpull = [None] * len(leaves)
            if dgs is not None:
                dpull = torch.autograd.grad([ys[i] for i in idx], leaves, [dgs[i] for i in idx], allow_unused=True)
        out = [torch.zeros_like(leaf) if b is None else b.detach() for b, leaf in zip(bar, leaves)]
        dout = [_sum(h, d, leaf) for h, d, leaf in zip(hv, dpull, leaves)]
        n = len(a)
        return (tuple(out[:n]), tuple(out[n:])), (tuple(dout[:n]), tuple(dout[n:]))


def _leaves(ts: tuple) -> list:
    return [t.detach().requires_grad_() for t in ts]


def _sum(a: Any, b: Any, like: torch.Tensor) -> torch.Tensor:
    parts = [t.detach() for t in (a, b) if t is not None]
    return sum(parts[1:], parts[0]) if parts else torch.zeros_like(like)


def getitem_forward(x: Any, xdot: Any, index: Any) -> tuple[Any, Any]:
    """``(x[index], ẋ[index])`` for a tensor or a tuple (an output of a generic node)."""
    y = x[index]
    return y, (None if xdot is None else xdot[index])


def getitem_backward(x: Any, index: Any, g: Any, dg: Any) -> tuple[Any, Any]:
    """The pullback of ``x[index]`` for ``Ȳ = g`` and ``Ȳ̇ = dg`` (linear, so the same map twice):
    a tuple with ``g`` at ``index`` and ``None`` elsewhere, or the tensor pullback (zeros with ``g``
    added at ``index``).

    Example:
        >>> getitem_backward(torch.zeros(3), 1, torch.tensor(2.), None)
        (tensor([0., 2., 0.]), None)
    """
    if isinstance(x, (tuple, list)):
        def put(t: Any) -> Any:
            return None if t is None else tuple(t if i == index else None for i in range(len(x)))
        return put(g), put(dg)

    if dg is None:
        return vjp(lambda t: t[index], x)[1](g)[0], None
    _, pull = vjp(lambda t: t[index], x)
    return pull(g)[0], pull(dg)[0]


__all__ = ["NodeFn", "add_tree", "fill_zeros", "getitem_forward", "getitem_backward"]
