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
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx
from tqdm.auto import tqdm

from oba_fx import meta as M
from oba_fx.attention import has_lowered_attention
from oba_fx.masking import masked_reference
from oba_fx.ops import count_flops
from oba_fx.schedule import channel_ceiling, exponential_schedule, units_this_step
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
                  concrete_args: dict | None = None, frozen_modules: Iterable[str] = (),
                  norm_width: bool = False) -> torch.fx.GraphModule:
    """Trace a copy of ``model``, propagate shapes, compute the coupling and the Hessian block
    structure."""
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    check_inputs(gm, example_inputs)
    try:
        ShapePropPass(example_inputs)(gm)
    except Exception as e:
        if not has_lowered_attention(gm):
            raise
        log.warning("the traced nn.MultiheadAttention stand-in does not run on these inputs (%s: %s); "
                    "tracing again with nn.MultiheadAttention kept whole (its heads stay)", type(e).__name__, e)
        gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, lower_attention=False)
        ShapePropPass(example_inputs)(gm)
    CouplingPass(frozen_modules, norm_width)(gm)
    HessianStructurePass()(gm)
    return gm


def prune(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], scores: Mapping[str, torch.Tensor],
          target: Target, *, verify: bool = True, rtol: float = 1e-4, max_units: int | None = None,
          absolute: float | None = None) -> torch.fx.GraphModule:
    """Select, slim and verify an analysed graph; returns the slimmed GraphModule with its report."""
    SelectPass(scores, target, max_units, absolute)(gm)
    sel, c = gm.meta[M.SELECTION], gm.meta[M.COUPLING]
    out = SlimPass(example_inputs)(gm).graph_module
    if verify:
        VerifyPass(masked_reference(gm, c, sel.removed), example_inputs, rtol)(out)
    err = out.meta.get(M.VERIFIED)
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
                   "round_to": target.round_to, "min_channels": target.min_channels},
        "flops_before": count_flops(gm),
        "flops_after": count_flops(out),
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in out.parameters()),
        "units_prunable": int(c.prunable.sum()),
        "units_removed": int(sel.removed.sum()),
        "groups": c.n_groups,
        "kept": kept,
        "barriers": [{"node": b.node, "op": b.op, "target": b.target, "reason": b.reason} for b in c.barriers],
        "heads": heads_report(c, sel.removed),
        "max_rel_error": err,
        "steps": 1,
    }


def heads_report(c, removed) -> dict[str, list[int]]:
    """``{attention module (or node): [heads before, heads after]}``.

    Example:
        >>> import torch, oba_fx
        >>> _ = torch.manual_seed(0)
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = torch.nn.MultiheadAttention(8, 4, batch_first=True)
        ...         self.head = torch.nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))
        >>> out = oba_fx.prune_graph(Net(), torch.randn(2, 5, 8), criterion="l1", channel_ratio=0.7)
        >>> out.meta["oba"]["heads"]
        {'attn': [4, 3]}
    """
    out: dict[str, list[int]] = {}
    for h in c.heads:
        key = h.module or h.node
        if key in out:
            key = f"{key}:{h.node}"
        out[key] = [h.space.size, int(c.kept(h.space, removed).size)]
    return out


def compose_kept(first: dict, second: dict) -> dict:
    """Kept indices of two successive prunings, in the numbering of the first one's input.

    Example:
        >>> compose_kept({"w": {0: [0, 2, 3]}}, {"w": {0: [1, 2]}, "v": {1: [0]}})
        {'w': {0: [2, 3]}, 'v': {1: [0]}}
    """
    out = {name: dict(dims) for name, dims in first.items()}
    for name, dims in second.items():
        for dim, idx in dims.items():
            prev = out.get(name, {}).get(dim)
            out.setdefault(name, {})[dim] = [prev[i] for i in idx] if prev is not None else list(idx)
    return out


def run(model: torch.nn.Module, example_inputs: Sequence[Any], score_fn: Callable[[torch.nn.Module], Mapping],
        target: Target, *, steps: int = 1, verify: bool = True, rtol: float = 1e-4, progress: bool = True,
        analysis: dict | None = None) -> torch.fx.GraphModule:
    """Prune ``model`` to ``target`` in ``steps`` rescored steps (DESIGN.md §2 schedule).

    Each step analyses the current network, scores it with ``score_fn(graph_module)``, removes
    the units the exponential schedule allows (stopping as soon as the FLOPs / parameter target
    is met), slims and verifies. One step is one-shot pruning.
    """
    analysis = analysis or {}
    gm = analyze_model(model, example_inputs, **analysis)
    if steps == 1:
        return prune(gm, example_inputs, score_fn(gm), target, verify=verify, rtol=rtol)
    measure0 = count_flops(gm) if target.kind == "flops" else sum(p.numel() for p in gm.parameters())
    budget = None if target.kind == "channels" else target.value * measure0
    p = target.value if target.kind == "channels" else channel_ceiling(target.value)
    n0 = int(gm.meta[M.COUPLING].prunable.sum())
    first: dict | None = None
    kept: dict = {}
    removed = 0
    out = gm
    bar = tqdm(exponential_schedule(p, steps), desc="pruning steps", disable=not progress, leave=False)
    for t, p_t in enumerate(bar, 1):
        if t > 1:
            gm = analyze_model(out, example_inputs, **{k: v for k, v in analysis.items() if k != "concrete_args"})
        k = units_this_step(p_t, n0, removed)
        last = t == steps
        out = prune(gm, example_inputs, score_fn(gm), target, verify=verify, rtol=rtol,
                    max_units=None if (last and budget is not None) else k, absolute=budget)
        r = out.meta[M.REPORT]
        first = first or r
        kept = compose_kept(kept, r["kept"])
        removed += r["units_removed"]
        now = r["flops_after"] if target.kind == "flops" else r["params_after"]
        log.info("step %d/%d: removed %d units (%d in all), %s %d", t, steps, r["units_removed"], removed,
                 target.kind, now)
        if budget is not None and now <= budget:
            break
    r = dict(out.meta[M.REPORT])
    heads = {k: [first["heads"].get(k, v)[0], v[1]] for k, v in r["heads"].items()}
    r.update(flops_before=first["flops_before"], params_before=first["params_before"], kept=kept, heads=heads,
             units_prunable=first["units_prunable"], units_removed=removed, steps=t)
    out.meta[M.REPORT] = r
    return out
