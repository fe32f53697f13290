"""The one place that runs the passes in order: trace -> shapes -> coupling -> scores ->
select -> slim -> verify.

Example:
    >>> import torch
    >>> from oba_fx.select import Target
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = analyze_model(m, (torch.randn(2, 4),))
    >>> out = prune(gm, (torch.randn(2, 4),), {n: p.abs() for n, p in gm.named_parameters()},
    ...             Target("channels", 0.5))
    >>> out.get_submodule("0").out_features
    4
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx

from oba_fx import meta as M
from oba_fx.masking import masked_reference
from oba_fx.ops import count_flops
from oba_fx.select import Target
from oba_fx.tracing import check_inputs, trace

from .coupling import CouplingPass
from .hessian_structure import HessianStructurePass
from .select import SelectPass
from .shape_prop import ShapePropPass
from .slim import SlimPass
from .verify import VerifyPass

log = logging.getLogger(__name__)


def analyze_model(model: torch.nn.Module, example_inputs: Sequence[Any], *, leaf_modules: Iterable = (),
                  concrete_args: dict | None = None, frozen_modules: Iterable[str] = ()) -> torch.fx.GraphModule:
    """Trace a copy of ``model``, propagate shapes, compute the coupling and the Hessian block
    structure."""
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    check_inputs(gm, example_inputs)
    ShapePropPass(example_inputs)(gm)
    CouplingPass(frozen_modules)(gm)
    HessianStructurePass()(gm)
    return gm


def prune(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], scores: Mapping[str, torch.Tensor],
          target: Target, *, verify: bool = True, rtol: float = 1e-4) -> torch.fx.GraphModule:
    """Select, slim and verify an analysed graph; returns the slimmed GraphModule with its report."""
    SelectPass(scores, target)(gm)
    sel, c = gm.meta[M.SELECTION], gm.meta[M.COUPLING]
    out = SlimPass(example_inputs)(gm).graph_module
    err = None
    if verify:
        ref = masked_reference(gm, c, sel.removed)
        VerifyPass(ref, example_inputs, rtol)(out)
        from oba_fx.verify import compare
        err = compare(out, ref, example_inputs, rtol)
    out.meta.clear()
    for n in out.graph.nodes:
        n.meta.pop(M.SPACES, None)
    out.meta[M.REPORT] = report(gm, out, c, sel, target, err)
    return out


def report(gm, out, c, sel, target: Target, err: float | None) -> dict:
    """The dict stored in ``compiled.meta["oba"]``."""
    kept: dict[str, dict[int, list[int]]] = {}
    params = dict(gm.named_parameters())
    for (name, dim), s in c.param_spaces.items():
        if name not in params:
            continue
        k = c.kept(s, sel.removed)
        if k.size < s.size:
            kept.setdefault(name, {})[dim] = k.tolist()
    return {
        "target": {"kind": target.kind, "value": target.value, "max_layer_ratio": target.max_layer_ratio,
                   "round_to": target.round_to},
        "flops_before": count_flops(gm),
        "flops_after": count_flops(out),
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in out.parameters()),
        "units_prunable": int(c.prunable.sum()),
        "units_removed": int(sel.removed.sum()),
        "groups": c.n_groups,
        "kept": kept,
        "barriers": [{"node": b.node, "op": b.op, "target": b.target, "reason": b.reason} for b in c.barriers],
        "max_rel_error": err,
    }
