"""Compensation: re-fit the layers that read removed units (``gm.meta["oba.compensation"]``).

Runs between select and slim: it updates the analysed graph's own weights, so the slimmed
network and the masked reference built afterwards both carry the re-fit weights, and
verification checks slimmed == compensated-masked.

Example:
    >>> import torch
    >>> from oba_fx.select import Target
    >>> from oba_fx.passes import ScorePass, SelectPass, SlimPass
    >>> from oba_fx.passes.pipeline import analyze_model
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = analyze_model(m, (torch.randn(2, 4),))
    >>> _ = ScorePass("l1")(gm)
    >>> _ = SelectPass(Target("channels", 0.5))(gm)
    >>> _ = CompensatePass([(torch.randn(32, 4), None)], progress=False)(gm)
    >>> [f.weight for f in gm.meta["oba.compensation"].fits]
    ['2.weight']
    >>> SlimPass((torch.randn(2, 4),))(gm).graph_module.get_submodule("2").in_features
    4
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from oba_fx import meta as M
from oba_fx.compensate import compensate

from .base import OBAPass


class CompensatePass(OBAPass):
    """Re-fit every layer reading removed units by ridge least squares on ``data``
    (:func:`oba_fx.compensate.compensate`, whose arguments these are).

    ``reference`` (the dense network) and ``reference_outputs`` (its output channel of each
    output channel of an already slimmed layer) make a later pruning step fit the original
    network's layer outputs rather than those of ``gm`` as it is.

    Reads ``gm.meta["oba.coupling"]`` and ``gm.meta["oba.selection"]``; updates ``gm``'s
    parameters in place; writes :class:`oba_fx.compensate.Compensation`.
    """

    REQUIRES = (M.COUPLING, M.SELECTION)
    ENSURES = (M.COMPENSATION,)

    def __init__(self, data: Iterable, *, max_batches: int | None = None, positions: int | None = 96,
                 ridge: float = 1e-3, scope: str = "removed", seed: int = 0, progress: bool = True,
                 reference: torch.fx.GraphModule | None = None,
                 reference_outputs: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.data = data
        self.kw = dict(max_batches=max_batches, positions=positions, ridge=ridge, scope=scope, seed=seed,
                       progress=progress, reference=reference, reference_outputs=reference_outputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        rec = compensate(gm, gm.meta[M.COUPLING], gm.meta[M.SELECTION].removed, self.data, **self.kw)
        gm.meta[M.COMPENSATION] = rec
        return PassResult(gm, bool(rec.fits))
