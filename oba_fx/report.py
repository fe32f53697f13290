"""The report of a pruning run: the dict a user reads in ``compiled.meta["oba"]``.

Built from the records the passes wrote (coupling, selection, verification); successive steps
compose with :func:`compose_kept` and :func:`merge_steps`.

Example:
    >>> compose_kept({"w": {0: [0, 2, 3]}}, {"w": {0: [1]}})
    {'w': {0: [2]}}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx

from .ops import FlopCtx, count_flops, rule_for_node, shape_of
from .meta import SPECIALISED
from .pictures.common import module_path
from .select import Selection, Target
from .spaces import Coupling
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)


def build_report(gm: torch.fx.GraphModule, out: torch.fx.GraphModule, c: Coupling, sel: Selection, target: Target,
                 err: float | None) -> dict:
    """The dict stored in ``compiled.meta["oba"]`` after one pruning step of ``gm`` into ``out``."""
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
                   "round_to": target.round_to, "min_channels": target.min_channels,
                   "ranking": target.ranking, "keep_residual": target.keep_summed},
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
        "layers": layer_sizes(gm, out),
        "flops_by_module": flops_by_module(gm, out),
        "specialised": gm.meta.get(SPECIALISED),
    }


def layer_sizes(before: torch.nn.Module, after: torch.nn.Module) -> dict[str, list]:
    """``{layer: [weight name, unit, out size before, after]}`` for every weight of 2 or more dims
    (unit ``"channels"`` for a convolution, ``"neurons"`` otherwise).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Sequential(torch.nn.Linear(2, 8)), torch.nn.Sequential(torch.nn.Linear(2, 5))
        >>> layer_sizes(a, b)
        {'0': ['0.weight', 'neurons', 8, 5]}
    """
    now = dict(after.named_parameters())
    out: dict[str, list] = {}
    for name, p in before.named_parameters():
        if p.dim() < 2 or not name.endswith("weight") or name not in now:
            continue
        dim = 1 if isinstance(before.get_submodule(name.rpartition(".")[0]), torch.nn.modules.conv._ConvTransposeNd) else 0
        layer = name[: -len("weight")].rstrip("._") or name
        out[layer] = [name, "channels" if p.dim() > 2 else "neurons", int(p.shape[dim]), int(now[name].shape[dim])]
    return out


def _node_flops(gm: torch.fx.GraphModule) -> dict[str, int]:
    flops: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or shape_of(node) is None:
            continue
        rule = rule_for_node(gm, node)
        if rule is not None and rule.flops is not None:
            key = module_path(node)
            flops[key] = flops.get(key, 0) + int(rule.flops(FlopCtx(gm, node, shape_of)))
    return flops


def flops_by_module(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> dict[str, list[int]]:
    """``{module path: [FLOPs before, after]}`` (the ops of a module's own ``forward``; ``""``: the root)."""
    a, b = _node_flops(before), _node_flops(after)
    return {k: [a.get(k, 0), b.get(k, 0)] for k in dict.fromkeys([*a, *b])}


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


def compensation_summary(comp) -> dict | None:
    """The report's view of a :class:`oba_fx.compensate.Compensation` (``None``: none ran)."""
    if comp is None:
        return None
    return {"layers_refit": len(comp.fits), "layers_skipped": [f"{s.node}: {s.reason}" for s in comp.skipped],
            "images": comp.images, "scope": comp.scope, "positions": comp.positions, "ridge": comp.ridge,
            "output_rel_error": comp.output_rel_error, "seconds": comp.seconds}


def merge_steps(first: dict, last: dict, kept: dict, removed: int, steps: int) -> dict:
    """The report of a multi-step run: ``last``'s, with the before-numbers of ``first``, the
    composed kept indices and the total of removed units."""
    r = dict(last)
    heads = {k: [first["heads"].get(k, v)[0], v[1]] for k, v in last["heads"].items()}
    r.update(flops_before=first["flops_before"], params_before=first["params_before"], kept=kept, heads=heads,
             units_prunable=first["units_prunable"], units_removed=removed, steps=steps,
             specialised=first.get("specialised"))
    if "layers" in first and "layers" in last:
        r["layers"] = {k: [*v[:2], first["layers"].get(k, v)[2], v[3]] for k, v in last["layers"].items()}
        r["flops_by_module"] = {k: [first["flops_by_module"].get(k, v)[0], v[1]]
                                for k, v in last["flops_by_module"].items()}
    return r


# ------------------------------------------------------------------------------ pictures, HTML
def _analysed(gm: torch.fx.GraphModule, example_inputs: Any) -> torch.fx.GraphModule:
    """A copy of ``gm`` with the coupling and the Hessian block structure (shapes from the nodes'
    ``tensor_meta``, or propagated from ``example_inputs``)."""
    from .coupling import analyze
    from .hessian_blocks import block_structure
    from .meta import COUPLING, HESSIAN_STRUCTURE, TENSOR_META
    from .tracing import as_tuple, clone, propagate_shapes

    g = clone(gm)
    if any(TENSOR_META not in n.meta for n in g.graph.nodes if n.op != "output"):
        if example_inputs is None:
            raise BadInputError("the graph has no shapes (tensor_meta): pass example_inputs=, or analysis= (the "
                             "original model analysed by oba_fx.passes.pipeline.analyze_model)")
        propagate_shapes(g, as_tuple(example_inputs))
    g.meta[COUPLING] = analyze(g)
    g.meta[HESSIAN_STRUCTURE] = block_structure(g)
    return g


def _timed(times: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - t, 2)
    return out


def write_pictures(analysis: torch.fx.GraphModule, report: dict, directory: str | Path, name: str = "model",
                   history: Any = None) -> dict[str, tuple[Path, str]]:
    """Write the pictures of a run and their data into ``directory``; returns
    ``{heading: (PNG path, caption)}``. Files: ``hessian_blocks.png/.csv``, ``dataflow.png/.dot/.graphml``
    (the DOT/GraphML hold the whole graph, nothing collapsed), ``removed.png`` and, with ``history``,
    ``finetune.png``. Seconds per picture are logged and stored in ``report["picture_seconds"]``."""
    from .meta import HESSIAN_STRUCTURE
    from .pictures.blocks import block_matrix, draw_block_matrix, write_block_csv
    from .pictures.curves import draw_history
    from .pictures.dataflow import dataflow_graph, simplify, write_dataflow
    from .pictures.flowdraw import draw_dataflow
    from .pictures.removed import draw_removed

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    out: dict[str, tuple[Path, str]] = {}
    if HESSIAN_STRUCTURE not in analysis.meta:  # analyze_model computes it only when asked
        from .hessian_blocks import block_structure
        analysis.meta[HESSIAN_STRUCTURE] = block_structure(analysis)
    bm = block_matrix(analysis.meta[HESSIAN_STRUCTURE])
    write_block_csv(bm, d / "hessian_blocks.csv")
    out["Hessian block matrix"] = (_timed(times, "hessian_blocks", draw_block_matrix, bm, d / "hessian_blocks.png",
                                          f"{name}: blocks of the functional Hessian"),
                                   "Which layer pairs have a non-zero block of H_F (rows and columns in execution "
                                   "order; data: hessian_blocks.csv).")
    G = dataflow_graph(analysis)
    write_dataflow(G, d / "dataflow.dot")
    write_dataflow(G, d / "dataflow.graphml")
    out["Dataflow and coupling"] = (_timed(times, "dataflow", lambda: draw_dataflow(
        simplify(G), d / "dataflow.png", f"{name}: dataflow, coloured by coupling group")),
        "Layers left to right in execution order; whole graph: dataflow.dot / dataflow.graphml.")
    out["What was removed"] = (_timed(times, "removed", draw_removed, report, d / "removed.png",
                                      f"{name}: what was removed"), "Per layer before → after; FLOPs per stage.")
    if history is not None:
        out["Fine-tuning"] = (_timed(times, "finetune", draw_history, history, d / "finetune.png"),
                              "Training loss and evaluation accuracy per epoch.")
    log.info("pictures written to %s in %s seconds", d, times)
    report["picture_seconds"] = times
    return out


def write(gm: torch.fx.GraphModule, directory: str | Path, *, analysis: torch.fx.GraphModule | None = None,
          example_inputs: Any = None, accuracy: Mapping | None = None, history: Any = None,
          settings: Mapping | None = None, name: str = "model") -> Path:
    """Write the HTML report of a pruning run, with its pictures and data, into ``directory``.

    Args:
        gm: the pruned GraphModule (its ``gm.meta["oba"]`` is the report).
        directory: created if missing; receives ``report.html`` (self-contained: pictures inline,
            no script, nothing fetched) and the files of :func:`write_pictures`.
        analysis: the original model analysed (``oba_fx.passes.pipeline.analyze_model``); the
            block matrix and the dataflow show it. Default: ``gm`` itself, analysed here.
        example_inputs: only needed without ``analysis`` when ``gm``'s nodes carry no shapes.
        accuracy: ``{when: accuracy}`` or ``{when: {test set: accuracy}}`` (fractions).
        history: fine-tuning history (:class:`oba_fx.FinetuneResult` or a dict of lists).
        settings: more rows for the settings table (e.g. the command line's arguments).
        name: the model's name in titles.

    Returns:
        The path of ``report.html``.

    Example:
        >>> import os, tempfile, torch, oba_fx
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> small = oba_fx.prune_graph(m, torch.randn(1, 3, 8, 8), channel_ratio=0.5, verbose=False)
        >>> page = write(small, tempfile.mkdtemp(), accuracy={"before": 0.9, "after": 0.8})
        >>> sorted(os.listdir(page.parent))[:4], page.stat().st_size < 5e6
        (['dataflow.dot', 'dataflow.graphml', 'dataflow.png', 'hessian_blocks.csv'], True)
    """
    from .html_report import render
    from .meta import REPORT

    report = gm.meta.get(REPORT)
    if report is None:
        raise BadInputError("gm has no report (gm.meta['oba']): pass the GraphModule oba_fx.prune_graph returned")
    analysis = analysis if analysis is not None else _analysed(gm, example_inputs)
    images = write_pictures(analysis, report, directory, name, history)
    notes = [f"{name}: pictures drawn in {report['picture_seconds']} seconds."]
    page = render(report, images, f"oba_fx pruning report: {name}", accuracy, settings, history, notes)
    path = Path(directory) / "report.html"
    path.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
