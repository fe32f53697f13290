"""Fused HVP program: ``gm.meta["oba.hvp_program"]`` (:class:`oba_fx.hvp_program.HVPProgram`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from oba_fx import meta as M
from oba_fx.hvp import LossFn, check_hessian
from oba_fx.hvp_program import build_hvp_program
from oba_fx.errors import BadInputError


class HVPCodegen(PassBase):
    """Generate ONE fused FX program computing ``(loss, grads..., H θ...)`` for a batch.

    The program (:func:`oba_fx.hvp_program.build_hvp_program`) is an aten-level ``torch.fx.GraphModule``
    whose placeholders are the scored parameters, the other parameters, the buffers, ``x`` and
    ``y``; it is stored with its Hessian mode and parameter order as an
    :class:`oba_fx.hvp_program.HVPProgram` under ``gm.meta["oba.hvp_program"]``, where
    :func:`oba_fx.scoring.score` picks it up. ``gm`` itself is not changed.

    Args:
        example_batch: ``(x, y)`` shaped like the calibration batches. When ``None``, ``x`` is
            built from the placeholders' ``tensor_meta`` (shape propagation must have run) and
            ``y`` as class-0 targets for the default cross-entropy (tracing is symbolic, so the
            values do not matter).
        hessian: ``"functional"`` or ``"full"``.
        loss_fn: ``loss_fn(logits, y)``; default mean cross-entropy.
        param_names: scored parameters (default: the floating ones requiring grad).
        with_grad: also output the gradients.

    Example:
        >>> import torch
        >>> from oba_fx.hvp import fused_hvp
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> gm = torch.fx.symbolic_trace(m)
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> _ = HVPCodegen((x, y), hessian="full")(gm)
        >>> prog = gm.meta["oba.hvp_program"]
        >>> prog.hessian, prog.param_names[:2]
        ('full', ('0.weight', '0.bias'))
        >>> r, ref = prog(gm, x, y), fused_hvp(gm, (x, y), hessian="full")
        >>> all(torch.allclose(r.hvps[n], ref.hvps[n]) for n in prog.param_names)
        True
    """

    def __init__(self, example_batch: tuple[Any, Any] | None = None, *, hessian: str = "functional",
                 loss_fn: LossFn | None = None, param_names: Sequence[str] | None = None,
                 with_grad: bool = True) -> None:
        super().__init__()
        self.example_batch = example_batch
        self.hessian = check_hessian(hessian)
        self.loss_fn = loss_fn
        self.param_names = param_names
        self.with_grad = with_grad

    def _batch_from_meta(self, gm: torch.fx.GraphModule) -> tuple[Any, Any]:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise BadInputError(f"HVPCodegen needs example_batch=(x, y) for a graph with {len(placeholders)} inputs")
        tm = M.node_meta(placeholders[0], M.TENSOR_META)
        if self.loss_fn is not None:
            raise BadInputError("HVPCodegen needs example_batch=(x, y) when a custom loss_fn is given "
                             "(the target's shape is unknown)")
        x = torch.zeros(tuple(tm.shape), dtype=tm.dtype)
        y = torch.zeros(tm.shape[0], dtype=torch.long)
        return x, y

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        batch = self.example_batch if self.example_batch is not None else self._batch_from_meta(gm)
        gm.meta[M.HVP_PROGRAM] = build_hvp_program(gm, batch, param_names=self.param_names, loss_fn=self.loss_fn,
                                                   hessian=self.hessian, with_grad=self.with_grad)
        return PassResult(gm, False)
