"""The one place that runs the passes in order.

``trace -> shapes -> coupling (-> Hessian structure)`` (:func:`analyze_model`), then per pruning
step ``scores -> select -> compensate -> slim -> verify`` (:func:`prune_step`), steps on the exponential
schedule (:func:`run`), then BatchNorm recalibration of the result. The public API
(:func:`oba_fx.prune_graph`, :func:`oba_fx.explain`, ...) parses arguments into a
:class:`PruneConfig` and calls this module; nothing else orders the passes.

Example:
    >>> import torch
    >>> from oba_fx.select import Target
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> out = run(m, (torch.randn(2, 4),), PruneConfig(criterion="l1", target=Target("channels", 0.5)))
    >>> out.get_submodule("0").out_features, out.meta["oba"]["criterion"]
    (4, 'l1')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
from tqdm.auto import tqdm

from oba_fx import meta as M
from oba_fx.attention import has_lowered_attention
from oba_fx.errors import BadInputError
from oba_fx.masking import masked_reference
from oba_fx.ops import count_flops
from oba_fx.report import build_report, compensation_summary, compose_kept, merge_steps
from oba_fx.schedule import channel_ceiling, exponential_schedule, units_this_step
from oba_fx.select import Target
from oba_fx.tracing import check_inputs, clone, trace

from .bn_recalibration import BNRecalibrationPass
from .compensate import CompensatePass
from .coupling import CouplingPass
from .hessian_structure import HessianStructurePass
from .merge import MergePass
from .score import ScorePass
from .select import SelectPass
from .shape_prop import ShapePropPass
from .slim import SlimPass
from .verify import VerifyPass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    """Everything one pruning run needs besides the model and the example inputs.

    Attributes:
        criterion: a registered criterion (:mod:`oba_fx.criteria`).
        target: what to reach (:class:`oba_fx.select.Target`).
        data: calibration batches ``(x, y)``: scores of data-driven criteria and BatchNorm
            recalibration.
        score_options: passed to :func:`oba_fx.score` (``hessian``, ``loss_fn``, ``seed``...).
        max_batches: use at most this many calibration batches.
        steps: rescored pruning steps (1: one-shot).
        verify: check every step's slimmed network against the masked original.
        rtol: that check's tolerance, relative to the largest output magnitude.
        compensation: options of :class:`~oba_fx.passes.compensate.CompensatePass` (``scope``,
            ``positions``, ``ridge``...) to re-fit, after each selection, the layers reading
            removed units on ``data``; ``None``: no compensation. With ``steps > 1``, the option
            ``toward`` says what every step fits to: ``"dense"`` (default) the original network's
            layer outputs, ``"previous"`` those of the network the step starts from (the
            previous step's pruned and re-fit one).
        bn_recalibration: re-estimate BatchNorm statistics on ``data`` at the end.
        progress: progress bars.
        analysis: options of :func:`analyze_model` (``leaf_modules``, ``concrete_args``,
            ``frozen_modules``, ``norm_width``).
        merge: ``None``, or ``(mode, fraction)`` to fold removed units into kept partners
            between selection and slimming (:class:`~oba_fx.passes.merge.MergePass`).
    """

    criterion: str
    target: Target
    data: Iterable | None = None
    score_options: Mapping[str, Any] = field(default_factory=dict)
    max_batches: int | None = None
    steps: int = 1
    verify: bool = True
    rtol: float = 1e-4
    compensation: Mapping[str, Any] | None = None
    bn_recalibration: bool = True
    progress: bool = True
    analysis: Mapping[str, Any] = field(default_factory=dict)
    merge: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        toward = (self.compensation or {}).get("toward", "dense")
        if toward not in TOWARDS:
            raise BadInputError(f"compensation toward must be one of {TOWARDS}, got {toward!r}")


#: what compensation fits to in a multi-step run (``PruneConfig.compensation["toward"]``)
TOWARDS = ("dense", "previous")


def analyze_model(model: torch.nn.Module, example_inputs: Sequence[Any], *, leaf_modules: Iterable = (),
                  concrete_args: dict | None = None, frozen_modules: Iterable[str] = (),
                  norm_width: bool = False, hessian_structure: bool = False,
                  share_weights: bool = False) -> torch.fx.GraphModule:
    """Trace a copy of ``model``, propagate shapes, compute the coupling and, with
    ``hessian_structure``, the Hessian block structure (``gm.meta["oba.hessian_structure"]``;
    pruning does not read it, :func:`oba_fx.hessian_structure` and the pictures do).

    ``share_weights``: the graph holds the model's own parameter tensors instead of copies
    (:func:`oba_fx.tracing.trace`); only for a result that is read, never pruned or re-fit."""
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, example_inputs=example_inputs,
               share_weights=share_weights)
    check_inputs(gm, example_inputs)
    try:
        ShapePropPass(example_inputs)(gm)
    except Exception as e:
        if not has_lowered_attention(gm):
            raise
        log.warning("the traced nn.MultiheadAttention stand-in does not run on these inputs (%s: %s); "
                    "tracing again with nn.MultiheadAttention kept whole (its heads stay)", type(e).__name__, e)
        gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, lower_attention=False,
                   example_inputs=example_inputs, share_weights=share_weights)
        ShapePropPass(example_inputs)(gm)
    CouplingPass(frozen_modules, norm_width)(gm)
    if hessian_structure:
        HessianStructurePass()(gm)
    return gm


def prune(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], scores: Mapping[str, torch.Tensor] | None,
          target: Target, *, verify: bool = True, rtol: float = 1e-4, max_units: int | None = None,
          absolute: float | None = None, compensate: CompensatePass | None = None,
          merge: tuple[str, float] | None = None) -> torch.fx.GraphModule:
    """Select, (merge or compensate,) slim and verify an analysed graph; returns the slimmed
    GraphModule with its report.

    ``scores`` (per parameter) are stored as ``gm.meta["oba.scores"]``; with ``None`` the scores
    a :class:`~oba_fx.passes.score.ScorePass` already wrote are used. ``compensate`` re-fits the
    layers that read removed units before slimming, so verification checks slimmed ==
    compensated-masked.
    """
    if scores is not None:
        gm.meta[M.SCORES] = scores
    SelectPass(target, max_units, absolute)(gm)
    if merge is not None:
        MergePass(*merge)(gm)
    if compensate is not None:
        compensate(gm)
    comp = gm.meta.get(M.COMPENSATION)
    sel, c = gm.meta[M.SELECTION], gm.meta[M.COUPLING]
    out = SlimPass(example_inputs)(gm).graph_module
    if verify:
        VerifyPass(masked_reference(gm, c, sel.removed), example_inputs, rtol)(out)
    err = out.meta.get(M.VERIFIED)
    out.meta.clear()
    for n in out.graph.nodes:
        n.meta.pop(M.SPACES, None)
    out.meta[M.REPORT] = build_report(gm, out, c, sel, target, err)
    out.meta[M.REPORT]["compensation"] = compensation_summary(comp)
    if M.SPECIALISED in gm.meta:
        out.meta[M.SPECIALISED] = gm.meta[M.SPECIALISED]
    if merge is not None:
        out.meta[M.REPORT]["merge"] = gm.meta[M.MERGED].summary()
    return out


def prune_step(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: PruneConfig, *,
               max_units: int | None = None, absolute: float | None = None,
               reference: torch.fx.GraphModule | None = None,
               reference_outputs: Mapping[str, Sequence[int]] | None = None) -> torch.fx.GraphModule:
    """One step on an analysed graph: score with the configured criterion, then :func:`prune`.

    ``reference`` / ``reference_outputs``: the dense network and, per slimmed layer, its output
    channels that ``gm``'s are (:func:`oba_fx.compensate.retarget`), for compensation toward
    the original network; ``None``: toward ``gm`` as it is."""
    ScorePass(config.criterion, config.data, max_batches=config.max_batches, progress=config.progress,
              **config.score_options)(gm)
    comp = None
    if config.compensation is not None and config.data is not None:
        opts = {k: v for k, v in config.compensation.items() if k != "toward"}
        comp = CompensatePass(config.data, max_batches=config.max_batches, progress=config.progress,
                              reference=reference, reference_outputs=reference_outputs, **opts)
    return prune(gm, example_inputs, None, config.target, verify=config.verify, rtol=config.rtol,
                 max_units=max_units, absolute=absolute, compensate=comp, merge=config.merge)


def run(model: torch.nn.Module, example_inputs: Sequence[Any], config: PruneConfig) -> torch.fx.GraphModule:
    """Prune ``model`` as ``config`` says and return the slimmed GraphModule with its report.

    With ``config.steps > 1``, each step analyses the current network, rescores it, removes the
    units the exponential schedule allows (stopping as soon as the FLOPs / parameter target is
    met), compensates (toward the original dense network's layer outputs unless
    ``compensation["toward"] == "previous"``), slims and verifies (``docs/design.md``
    "Schedule"). Then BatchNorm statistics are re-estimated on the calibration inputs when
    ``config.bn_recalibration`` and data are given.
    """
    out = _steps(model, example_inputs, config) if config.steps > 1 else prune_step(
        analyze_model(model, example_inputs, **config.analysis), example_inputs, config)
    report = out.meta[M.REPORT]
    report["criterion"] = config.criterion
    report["bn_recalibrated"] = False
    if config.bn_recalibration and config.data is not None:
        BNRecalibrationPass(config.data, config.max_batches)(out)
        report["bn_recalibrated"] = bool(out.meta.pop(M.BN_RECALIBRATED))
    return out


def _steps(model: torch.nn.Module, example_inputs: Sequence[Any], config: PruneConfig) -> torch.fx.GraphModule:
    target = config.target
    gm = analyze_model(model, example_inputs, **config.analysis)
    measure0 = count_flops(gm) if target.kind == "flops" else sum(p.numel() for p in gm.parameters())
    budget = None if target.kind == "channels" else target.value * measure0
    p = target.value if target.kind == "channels" else channel_ceiling(target.value)
    n0 = int(gm.meta[M.COUPLING].prunable.sum())
    later = {k: v for k, v in config.analysis.items() if k != "concrete_args"}
    toward_dense = (config.compensation is not None and config.data is not None
                    and config.compensation.get("toward", "dense") == "dense")
    dense = clone(gm) if toward_dense else None  # step 1 re-fits gm in place
    first: dict | None = None
    kept: dict = {}
    removed = 0
    out = gm
    bar = tqdm(exponential_schedule(p, config.steps), desc="pruning steps", disable=not config.progress, leave=False)
    for t, p_t in enumerate(bar, 1):
        if t > 1:
            gm = analyze_model(out, example_inputs, **later)
        last = t == config.steps
        k = units_this_step(p_t, n0, removed)
        out = prune_step(gm, example_inputs, config, max_units=None if (last and budget is not None) else k,
                         absolute=budget, reference=dense if t > 1 else None,
                         reference_outputs={name: dims[0] for name, dims in kept.items() if 0 in dims})
        r = out.meta[M.REPORT]
        first = first or r
        kept = compose_kept(kept, r["kept"])
        removed += r["units_removed"]
        now = r["flops_after"] if target.kind == "flops" else r["params_after"]
        log.info("step %d/%d: removed %d units (%d in all), %s %d", t, config.steps, r["units_removed"], removed,
                 target.kind, now)
        if budget is not None and now <= budget:
            break
    out.meta[M.REPORT] = merge_steps(first, out.meta[M.REPORT], kept, removed, t)
    return out
