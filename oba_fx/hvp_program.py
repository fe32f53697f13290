"""The fused HVP as one generated, simplified aten-level FX program (:class:`HVPProgram`).

:func:`build_hvp_program` traces the computation of :func:`oba_fx.hvp.fused_hvp` in its
``torch.func`` form with ``make_fx`` and simplifies it with :mod:`oba_fx.hvp_simplify` (see
``docs/design.md``, "The fused HVP"): the tangent ``conv(X, θ)`` becomes the primal output, exact
zeros are dropped, and the program costs about 2x a gradient.

Example:
    >>> import torch
    >>> from oba_fx.hvp import fused_hvp
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    >>> prog = build_hvp_program(m, (x, y), hessian="functional", with_grad=False)
    >>> torch.allclose(prog(m, x, y).hvps["2.weight"], fused_hvp(m, (x, y)).hvps["2.weight"])
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn

from .hvp import (HVPResult, LossFn, check_hessian, default_loss_fn, fused_fn, math_attention, split_state,
                  trainable_param_names)
from .hvp_simplify import simplify_hvp_graph
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)

#: make_fx tracing mode ("fake" traces without running the kernels: faster, same graph)
TRACING_MODE = "fake"



def _signature(x: Any, y: Any) -> tuple:
    def sig(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return (tuple(t.shape), t.dtype, t.device.type)
        return type(t).__name__
    return sig(x), sig(y)


def training_flags(model: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in ``model.modules()`` order."""
    return tuple(m.training for m in model.modules())


@dataclass
class HVPProgram:
    """A generated, simplified aten-level FX program computing ``(loss, grads..., hvps...)``.

    Call it with the model whose state to read: ``program(model, x, y) -> HVPResult``. It is
    specialised to the traced input shapes, dtypes and train/eval flags (:meth:`matches`).

    Attributes:
        graph_module: the program; placeholders are the scored parameters, the other parameters,
            the buffers (in the orders below), then ``x`` and ``y``; outputs are
            ``(loss, *grads, *hvps)`` in ``param_names`` order (no grads if not ``with_grad``).
        param_names: order of the scored parameters.
        frozen_names: order of the other parameters.
        buffer_names: order of the buffers.
        hessian: ``"functional"`` or ``"full"``.
        with_grad: whether gradients are outputs.
        signature: shapes / dtypes of ``(x, y)`` it was traced for (``None``: any batch, the
            directly generated program of :mod:`oba_fx.hvp_direct`).
        training: the modules' ``training`` flags at trace time.
        loss_fn: the loss it was generated for.
        stats: node and op counts before and after simplification.
    """

    graph_module: torch.fx.GraphModule
    param_names: tuple[str, ...]
    frozen_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    hessian: str
    with_grad: bool
    signature: tuple
    training: tuple[bool, ...]
    loss_fn: LossFn = default_loss_fn
    stats: dict = field(default_factory=dict)

    def matches(self, model: nn.Module, x: Any, y: Any) -> bool:
        """Whether this program applies to ``model`` in its current mode and this batch."""
        return (self.signature is None or _signature(x, y) == self.signature) and training_flags(model) == self.training

    def inputs(self, model: nn.Module, x: Any, y: Any) -> list:
        """The flat input list for :attr:`graph_module`."""
        params = dict(model.named_parameters())
        bufs = dict(model.named_buffers())
        return ([params[n].detach() for n in self.param_names] + [params[n].detach() for n in self.frozen_names]
                + [bufs[n].detach() for n in self.buffer_names] + [x, y])

    def __call__(self, model: nn.Module, x: Any, y: Any) -> HVPResult:
        if not self.matches(model, x, y):
            raise BadInputError("this HVP program was generated for other input shapes or another train/eval mode; "
                             "check program.matches(model, x, y) or generate a new one")
        with torch.no_grad():
            out = self.graph_module(*self.inputs(model, x, y))
        k = len(self.param_names)
        loss, rest = out[0], list(out[1:])
        grads = dict(zip(self.param_names, rest[:k])) if self.with_grad else {}
        hvps = dict(zip(self.param_names, rest[k:] if self.with_grad else rest))
        return HVPResult(loss, grads, hvps, self.hessian)


def build_hvp_program(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                      loss_fn: LossFn | None = None, hessian: str = "functional", with_grad: bool = True,
                      simplify: bool = True) -> HVPProgram:
    """Generate the fused program (tangent ``v = θ``) for batches shaped like ``batch``.

    Args:
        model: as in :func:`fused_hvp` (its current train/eval mode is baked in).
        batch: an example ``(x, y)``; it is run once while tracing.
        param_names, loss_fn, hessian: as in :func:`fused_hvp`.
        with_grad: also output the gradients (else dead-code elimination drops the primal
            weight-gradients: about one conv / matmul per layer less).
        simplify: run :func:`simplify_hvp_graph` (else the raw ``make_fx`` trace).

    Returns:
        An :class:`HVPProgram`.

    Example:
        >>> from oba_fx.hvp import fused_hvp
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> prog = build_hvp_program(m, (x, y), hessian="full")
        >>> ref = fused_hvp(m, (x, y), hessian="full")
        >>> torch.allclose(prog(m, x, y).hvps["0.weight"], ref.hvps["0.weight"])
        True
    """
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    check_hessian(hessian)
    names = tuple(param_names) if param_names is not None else tuple(trainable_param_names(model))
    scored, frozen, buffers = split_state(model, names)
    loss_fn = loss_fn or default_loss_fn
    fn = fused_fn(model, loss_fn, hessian)
    frozen_names, buffer_names = tuple(frozen), tuple(buffers)
    k, kf, kb = len(names), len(frozen_names), len(buffer_names)

    def flat(*args):
        p = dict(zip(names, args[:k]))
        fz = dict(zip(frozen_names, args[k:k + kf]))
        bf = dict(zip(buffer_names, args[k + kf:k + kf + kb]))
        x, y = args[k + kf + kb:]
        loss, g, hv = fn(p, None, fz, bf, x, y)
        return (loss, *[g[n] for n in names if with_grad], *[hv[n] for n in names])

    x, y = batch
    args = [scored[n] for n in names] + [frozen[n] for n in frozen_names] + [buffers[n] for n in buffer_names] + [x, y]
    with math_attention():
        gm = make_fx(functionalize(flat, remove="mutations"), tracing_mode=TRACING_MODE)(*args)
    _name_placeholders(gm, [f"p_{n}" for n in names] + [f"f_{n}" for n in frozen_names]
                       + [f"b_{n}" for n in buffer_names] + ["x", "y"])
    stats = {"nodes_traced": len(gm.graph.nodes)}
    if simplify:
        stats.update(simplify_hvp_graph(gm))
    stats["nodes"] = len(gm.graph.nodes)
    log.info("HVP program for %d parameters (%s): %d nodes traced, %d after simplification",
             k, hessian, stats["nodes_traced"], stats["nodes"])
    return HVPProgram(gm, names, frozen_names, buffer_names, hessian, with_grad, _signature(x, y),
                      training_flags(model), loss_fn, stats)


def _name_placeholders(gm: torch.fx.GraphModule, names: Sequence[str]) -> None:
    """Give the program's placeholders readable names (best effort)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(names):
        return
    for node, name in zip(phs, names):
        safe = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
        try:
            node._rename(safe)
            node.target = node.name
        except Exception:  # pragma: no cover - private API; names are cosmetic
            return
    gm.recompile()
