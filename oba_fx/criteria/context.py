"""What a criterion's function sees: :class:`ScoreContext`.

The context holds the model (never mutated), the names and detached values of the scored
parameters, the loss, and the options of :func:`oba_fx.score`; its methods give the batch
gradient, the exact ``H θ`` (generated fused program where it fits, else the eager fused HVP,
see ``docs/design.md`` "The fused HVP") and the diagonal estimates the OBD baselines use.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(3, 2)
    >>> ctx = ScoreContext.for_model(m)
    >>> ctx.names
    ['weight', 'bias']
    >>> sorted(ctx.gradient(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
    ['bias', 'weight']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import meta as M
from ..estimators import empirical_fisher_diagonal, gradient, hutchinson_diagonal
from ..hvp import HVPResult, LossFn, default_loss_fn, fused_hvp
from ..hvp_cache import program_for
from ..hvp_program import HVPProgram

log = logging.getLogger(__name__)


@dataclass
class ScoreContext:
    """Per-call state of :func:`oba_fx.score`, handed to every criterion function.

    Attributes:
        model: the module being scored (read only).
        names: the floating-point parameters that are scored.
        params: their detached values by name.
        loss_fn: ``loss_fn(logits, y) -> scalar``.
        hessian: ``"functional"`` or ``"full"`` (for ``ctx.hvp``).
        first_order: weight of ``θ ⊙ g`` that ``"oba"`` adds.
        probes: Rademacher probes per batch (``"obd_hutchinson"``).
        seed: seeds ``generator`` and the ``"random"`` criterion.
        generator: a CPU generator for random probes.
        example_inputs: when given, models outside the direct generator's rules get the
            ``make_fx`` program too (:mod:`oba_fx.hvp_cache`).
    """

    model: nn.Module
    names: list[str]
    params: dict[str, torch.Tensor]
    loss_fn: LossFn = default_loss_fn
    hessian: str = "functional"
    first_order: float = 0.0
    probes: int = 16
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    example_inputs: Any = None

    @classmethod
    def for_model(cls, model: nn.Module, **options: Any) -> "ScoreContext":
        """A context scoring every floating-point parameter of ``model``."""
        params = {n: p.detach() for n, p in model.named_parameters()}
        names = [n for n, p in params.items() if p.is_floating_point()]
        ctx = cls(model, names, params, **{k: v for k, v in options.items() if v is not None})
        ctx.generator.manual_seed(ctx.seed)
        return ctx

    def gradient(self, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """The batch gradient ``g`` of every scored parameter."""
        return gradient(self.model, x, y, self.names, self.loss_fn)

    def hvp(self, x: Any, y: Any, with_grad: bool = False) -> HVPResult:
        """``H θ`` (and, with ``with_grad``, ``g``) for one batch, exact."""
        prog = self._program(x, y, with_grad)
        if prog is not None:
            return prog(self.model, x, y)
        return fused_hvp(self.model, (x, y), param_names=self.names, loss_fn=self.loss_fn, hessian=self.hessian)

    def fisher_diagonal(self, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """``diag`` of the empirical Fisher of the batch."""
        return empirical_fisher_diagonal(self.model, (x, y), param_names=self.names, loss_fn=self.loss_fn)

    def hutchinson_diagonal(self, x: Any, y: Any) -> dict[str, torch.Tensor]:
        """Hutchinson estimate of ``diag(H)`` with :attr:`probes` Rademacher probes."""
        return hutchinson_diagonal(self.model, (x, y), self.probes, param_names=self.names, loss_fn=self.loss_fn,
                                   generator=self.generator)

    # -- the generated program ---------------------------------------------------------------
    def _fits(self, prog: Any, x: Any, y: Any, with_grad: bool) -> bool:
        return (isinstance(prog, HVPProgram) and prog.hessian == self.hessian
                and list(prog.param_names) == self.names and (prog.with_grad or not with_grad)
                and prog.loss_fn is self.loss_fn and prog.matches(self.model, x, y))

    def _program(self, x: Any, y: Any, with_grad: bool) -> HVPProgram | None:
        """A generated program for this batch (:func:`oba_fx.hvp_cache.program_for`), or ``None``
        (run eagerly). A program attached to a GraphModule by ``HVPCodegen`` comes first; the
        ``make_fx`` program is generated only when ``example_inputs`` were given (for this batch's
        shape, whatever theirs)."""
        meta = getattr(self.model, "meta", None)
        attached = meta.get(M.HVP_PROGRAM) if isinstance(meta, dict) else None
        if attached is not None and self._fits(attached, x, y, with_grad):
            return attached
        if not isinstance(x, torch.Tensor):
            return None
        return program_for(self.model, x, y, names=self.names, hessian=self.hessian, loss_fn=self.loss_fn,
                           with_grad=with_grad, make_fx_ok=self.example_inputs is not None)
