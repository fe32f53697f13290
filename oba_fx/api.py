"""Public entry points: :func:`prune_graph`, :func:`explain`, :func:`hessian_structure`.

These are thin: they validate arguments, build a :class:`oba_fx.passes.pipeline.PruneConfig`
and run :mod:`oba_fx.passes.pipeline`, the one module that orders the passes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from .batches import reusable
from .checks import check_data, check_inputs_usable, check_model
from .criteria import criterion_names, get_criterion
from .distributed import is_main
from .passes.pipeline import PruneConfig, analyze_model, run
from .select import Target
from .tracing import as_tuple
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)

#: compensation options of prune_graph (measured on the pretrained ResNet-56, see the README)
COMPENSATION_DEFAULTS = {"scope": "all", "positions": 96, "ridge": 1e-3}


def _target(channel_ratio, target_flops, target_params, max_layer_ratio, round_to, min_channels=1,
            ranking="group_max", keep_summed=False) -> Target:
    given = {k: v for k, v in (("channels", channel_ratio), ("flops", target_flops), ("params", target_params))
             if v is not None}
    if len(given) != 1:
        raise BadInputError(
            "give exactly one target: channel_ratio=<fraction of channels removed>, target_flops=<retained "
            f"FLOPs fraction> or target_params=<retained parameter fraction>; got {sorted(given) or 'none'}")
    (kind, value), = given.items()
    return Target(kind, float(value), max_layer_ratio, round_to, min_channels, ranking, keep_summed)


def _module_names(model: nn.Module, ignore: Iterable[Any]) -> list[str]:
    names: list[str] = []
    by_id = {id(m): n for n, m in model.named_modules()}
    for x in ignore:
        if isinstance(x, str):
            if x not in dict(model.named_modules()):
                raise BadInputError(f"ignore: no module named {x!r} in the model; names look like "
                                 f"{[n for n, _ in list(model.named_modules())[1:4]]}")
            names.append(x)
        elif isinstance(x, nn.Module):
            if id(x) not in by_id:
                raise BadInputError(f"ignore: module {type(x).__name__} is not part of the model")
            names.append(by_id[id(x)])
        elif isinstance(x, type):
            names.extend(n for n, m in model.named_modules() if isinstance(m, x) and n)
        else:
            raise BadInputError(f"ignore: expected module names, modules or module classes, got {x!r}")
    return names


def prune_graph(model: nn.Module, example_inputs: Any, *, criterion: str = "l1",
                channel_ratio: float | None = None, target_flops: float | None = None,
                target_params: float | None = None, ignore: Iterable[Any] = (), round_to: int = 1,
                data: Iterable | None = None, loss_fn: Callable | None = None, hessian: str = "functional",
                max_batches: int | None = None, max_layer_ratio: float = 0.95, min_channels: int = 1,
                steps: int = 1, compensate: bool | dict | None = None, bn_recalibration: bool | None = None,
                leaf_modules: Iterable[type | str] = (),
                concrete_args: dict | None = None, verify: bool = True, rtol: float = 1e-4, seed: int = 0,
                verbose: bool = True, embed_width: bool = False, ranking: str | None = None, keep_residual: bool | None = None,
                merge: str | None = None, merge_fraction: float = 0.5,
                report_dir: str | Path | None = None) -> torch.fx.GraphModule:
    """Prune ``model`` to a target and return a physically slimmed ``torch.fx.GraphModule``.

    The model is traced (a deep copy: ``model`` is never modified), every channel dimension is
    coupled across the graph, channels are scored by ``criterion``, the lowest-ranked ones are
    removed until the target is met, and a smaller network is built and checked against the
    original with the removed channels masked.

    Args:
        model: the network.
        example_inputs: a tensor or a tuple of positional inputs; drives tracing, shapes and FLOPs.
        criterion: a registered criterion (:mod:`oba_fx.criteria`): ``"l1"``, ``"l2"``,
            ``"random"`` (data-free) or ``"oba"``, ``"taylor"``, ``"obd_fisher"``,
            ``"obd_hutchinson"`` (need ``data``), or one you registered.
        channel_ratio: fraction of prunable channels to remove, in [0, 1).
        target_flops: fraction of FLOPs to keep, in (0, 1].
        target_params: fraction of parameters to keep, in (0, 1].
        ignore: modules (names, instances or classes) whose parameters must not change.
        round_to: every layer that loses channels keeps a multiple of this many (see
            :func:`oba_fx.select.apply_round_to` for when the coupling cannot allow it).
        data: calibration batches ``(inputs, targets)`` for data-driven criteria: a list, a
            DataLoader or any iterable that can be read again; a one-shot iterator (a generator)
            is read once into a list of at most ``max_batches`` batches (they are read several
            times: the scores of each step, compensation, BatchNorm recalibration).
        loss_fn: ``loss_fn(outputs, targets)``; mean cross-entropy by default.
        hessian: ``"functional"`` or ``"full"`` (for ``criterion="oba"``).
        max_batches: use at most this many calibration batches.
        max_layer_ratio: the most any layer may lose (default 0.95).
        min_channels: every layer keeps at least this many channels.
        steps: prune in this many rescored steps with the paper's exponential schedule,
            stopping as soon as the target is met (1: one-shot).
        compensate: after each selection, re-fit every layer that reads removed channels by ridge
            least squares on the inputs of ``data`` so that its output matches the dense network's
            (:mod:`oba_fx.compensate`; needs ``data``). ``None`` (default): on whenever ``data`` is
            given; a dict passes options (``scope``, ``positions``, ``ridge``) to
            :class:`oba_fx.passes.compensate.CompensatePass`, and ``toward``: with ``steps > 1``,
            ``"dense"`` (default) fits every step to the original network's layer outputs,
            ``"previous"`` to the network the step starts from.
        bn_recalibration: after pruning, re-estimate BatchNorm running statistics on the
            inputs of ``data`` (no labels used; skipped without ``data``). ``None`` (default):
            only when no compensation ran (recalibrating after the re-fit undoes it: on the
            pretrained ResNet-56 it cost 7 points, see the README).
        leaf_modules: module classes or names to keep as opaque calls when tracing (their
            channels are then not pruned).
        concrete_args: passed to ``torch.fx`` tracing for arguments that drive control flow.
        verify: compare the result with the masked original on ``example_inputs``.
        rtol: tolerance of that comparison, relative to the largest output magnitude.
        seed: seed of the ``"random"`` criterion.
        verbose: progress bars over steps and calibration batches.
        embed_width: also prune the channels LayerNorm / RMSNorm normalise: in a transformer,
            the residual-stream width shared by the patch embedding, class token, position
            embedding, every LayerNorm, every block's output projections and the head. Off by
            default: a LayerNorm over fewer channels renormalises the kept ones, so removal is
            not the zeroing the scores assume (the verification reference renormalises too).
        ranking: how unit scores are compared across coupling groups: ``"group_max"`` (the OBA
            paper's rule: each group's scores divided by its maximum), ``"per_flop"`` (score
            divided by the FLOPs the unit's removal saves: a loss change per FLOP) or
            ``"global"`` (as they are), or ``"curvature"`` (each layer's removal fraction from its
            share of the scores, flat layers losing more: CAMP-HiVe's adaptive thresholds,
            :func:`oba_fx.select.curvature_keys`); ``None``: the criterion's own (``"per_flop"`` for
            ``"oba"`` and ``"taylor"``, measured better than the paper's ``"group_max"`` by
            ``benchmarks/ranking.py``), else ``"group_max"``.
        keep_residual: never remove channels that several layers write and add up (a residual
            stream: :func:`oba_fx.select.summed_units`); only the channels inside residual
            blocks go. ``None`` (default): on, unless ``embed_width`` asks for the residual width.
            On the pretrained ResNet-56 at half the FLOPs it is worth 4.7 points with
            compensation and 19 without (see the README).
        merge: ``None`` (default), ``"cyclic"`` or ``"similar"``: before slimming, fold each removed
            unit's outgoing weights (its consumers' input columns) into a kept unit of its
            coupling group (CAMP-HiVe's pair merging, :mod:`oba_fx.merging`); verification then
            checks slimmed == merged-masked.
        merge_fraction: share of a removed unit's columns added to its partner (default ½).
        report_dir: also write the run's HTML report and pictures there (:func:`oba_fx.report.write`).

    Returns:
        The slimmed GraphModule; ``compiled.meta["oba"]`` is the report (FLOPs and parameters
        before/after, kept indices of every pruned parameter, barriers).

    Raises:
        BadTypeError: (a ``TypeError``) ``model`` is not an ``nn.Module`` or is TorchScript;
            ``data`` is a bare tensor, or its batches are not ``(inputs, targets)`` pairs.
        BadInputError: (a ``ValueError``) a bad option; a model on the meta device or with
            non-finite weights; example inputs or batches that do not fit the model; labels
            that do not fit its logits (with the default ``loss_fn``).
        TraceError: the model cannot be traced (with the ways out).

    Example:
        >>> import torch, oba_fx
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        ...                         torch.nn.Conv2d(16, 4, 3)).eval()
        >>> out = oba_fx.prune_graph(m, torch.randn(1, 3, 8, 8), channel_ratio=0.5)
        >>> out.get_submodule("0").out_channels, out.meta["oba"]["flops_after"] < out.meta["oba"]["flops_before"]
        (8, True)
    """
    crit = get_criterion(criterion)
    ranking = ranking or crit.ranking or "group_max"
    keep_residual = (not embed_width) if keep_residual is None else keep_residual
    target = _target(channel_ratio, target_flops, target_params, max_layer_ratio, round_to, min_channels, ranking,
                     keep_residual)
    if int(steps) != steps or steps < 1:
        raise BadInputError(f"steps must be a positive integer, got {steps}")
    if crit.needs_data and data is None:
        raise BadInputError(
            f"criterion {criterion!r} needs calibration data: pass data=<iterable of (inputs, targets)>, "
            f"or use a data-free criterion ({', '.join(criterion_names(needs_data=False))})")
    if compensate is None:
        compensate = data is not None
    if compensate and data is None:
        raise BadInputError("compensate=True re-fits layers on calibration inputs: pass data=<iterable of (inputs, "
                         "targets)> or compensate=False")
    if bn_recalibration is None:
        bn_recalibration = not compensate
    if merge is not None:
        from .merging import PARTNER_MODES

        if merge not in PARTNER_MODES:
            raise BadInputError(f"merge must be None or one of {PARTNER_MODES}, got {merge!r}")
    check_model(model, "prune_graph")
    check_data(data, "prune_graph")
    data = reusable(data, max_batches)
    inputs = as_tuple(example_inputs)
    check_inputs_usable(inputs, "example_inputs")
    config = PruneConfig(
        criterion=criterion, target=target, data=data, max_batches=max_batches, steps=int(steps), verify=verify,
        rtol=rtol, bn_recalibration=bn_recalibration, progress=verbose and is_main(),
        compensation=(dict(COMPENSATION_DEFAULTS, **compensate) if isinstance(compensate, dict)
                      else dict(COMPENSATION_DEFAULTS) if compensate else None),
        score_options={"seed": seed, "hessian": hessian, "loss_fn": loss_fn},
        analysis={"leaf_modules": leaf_modules, "concrete_args": concrete_args,
                  "frozen_modules": _module_names(model, ignore), "norm_width": embed_width},
        merge=None if merge is None else (merge, float(merge_fraction)))
    out = run(model, inputs, config)
    out.train(model.training)
    if report_dir is not None:
        from .report import write
        write(out, report_dir, analysis=analyze_model(model, inputs, **config.analysis, hessian_structure=True))
    return out


def explain(model: nn.Module, example_inputs: Any, *, path: str | Path | None = None,
            hessian_path: str | Path | None = None, leaf_modules: Iterable[type | str] = (),
            concrete_args: dict | None = None) -> nx.Graph:
    """The coupling graph of ``model`` as a networkx graph, optionally written to ``path``.

    Nodes are coupling groups (``kind="group"``) and parameter dimensions (``kind="param"``,
    with ``owner``, ``dim``, ``size``, ``group``); an edge joins each parameter dimension to its
    group. Barriers are listed in ``G.graph["barriers"]``.

    Args:
        path: ``.dot``, ``.graphml``, ``.json``, ``.png`` or ``.svg``; the suffix picks the format.
        hessian_path: where to write the Hessian block graph (:func:`hessian_structure`), same formats.

    Example:
        >>> import torch, oba_fx
        >>> G = oba_fx.explain(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)), torch.randn(1, 2))
        >>> sorted(d["owner"] for _, d in G.nodes(data=True) if d["kind"] == "param")[:2]
        ['0.bias', '0.weight']
    """
    from .graphs import coupling_graph, write_graph

    check_model(model, "explain", finite=False)
    gm = analyze_model(model, as_tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args,
                       hessian_structure=hessian_path is not None, share_weights=True)
    G = coupling_graph(gm.meta["oba.coupling"])
    if path is not None:
        write_graph(G, path)
    if hessian_path is not None:
        write_graph(gm.meta["oba.hessian_structure"], hessian_path)
    return G


def hessian_structure(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[type | str] = (),
                      concrete_args: dict | None = None) -> nx.Graph:
    """Which blocks of the functional Hessian of ``model`` can be non-zero.

    Returns an undirected networkx graph whose nodes are the module names of parameterised
    layers; an edge (attribute ``kind`` in {"series", "parallel"}) marks a block that may be
    non-zero, a self-loop a layer whose own block may be non-zero; every absent pair is an
    exact zero. See :mod:`oba_fx.hessian_blocks` for the rules.

    Example:
        >>> import torch, oba_fx
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> G = oba_fx.hessian_structure(m, torch.randn(1, 2))
        >>> sorted(G.edges(data="kind"))
        [('0', '0', 'parallel'), ('0', '2', 'series')]
    """
    check_model(model, "hessian_structure", finite=False)
    gm = analyze_model(model, as_tuple(example_inputs), leaf_modules=leaf_modules, concrete_args=concrete_args,
                       hessian_structure=True, share_weights=True)
    return gm.meta["oba.hessian_structure"]
