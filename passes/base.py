"""The base of every oba_fx pass: declared preconditions and postconditions on ``gm.meta``.

A pass lists the graph-level records it reads (``requires``) and writes (``ensures``);
``torch.fx``'s ``PassBase.__call__`` checks them around ``call``. A missing record raises
:class:`oba_fx.errors.MissingAnalysisError` naming the pass that writes it.

Example:
    >>> import torch
    >>> from oba_fx.passes.select import SelectPass
    >>> from oba_fx.select import Target
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> try:
    ...     SelectPass(Target("channels", 0.5))(gm)
    ... except Exception as e:
    ...     print(type(e).__name__, str(e).split(";")[1].strip())
    MissingAnalysisError run oba_fx.passes.coupling.CouplingPass first
"""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase

from oba_fx import meta as M
from oba_fx.errors import OBAError


class OBAPass(PassBase):
    """A ``PassBase`` whose ``REQUIRES`` / ``ENSURES`` name ``gm.meta`` keys (:mod:`oba_fx.meta`)."""

    #: ``gm.meta`` keys that must be present before the pass runs
    REQUIRES: tuple[str, ...] = ()
    #: ``gm.meta`` keys the pass writes into the graph module it is given
    ENSURES: tuple[str, ...] = ()

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        for key in self.REQUIRES:
            M.graph_meta(graph_module, key)

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        missing = [k for k in self.ENSURES if k not in graph_module.meta]
        if missing:  # an internal error: the pass did not do its job
            raise OBAError(f"{type(self).__name__} did not write {missing} into gm.meta (a bug in oba_fx: "
                           "please report it with the model)")
