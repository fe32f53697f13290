"""Analysis and pruning speed of oba_fx against Torch-Pruning on torchvision models.

For each model (random weights, eval mode, input 1x3x224x224) and each of N runs (median
reported):

* ours, analysis: ``oba_fx.passes.pipeline.analyze_model`` (trace + shape propagation +
  channel coupling);
* ours, scores:   ``oba_fx.score(gm, None, criterion="l1")``;
* ours, prune:    ``oba_fx.passes.pipeline.prune(gm, x, scores, Target("channels", 0.3),
  verify=False)`` (select + slim);
* theirs, analysis: ``tp.DependencyGraph().build_dependency(model, x)`` on a fresh deepcopy;
* theirs, pruner: ``tp.pruner.MetaPruner(...)`` construction (it builds its own dependency
  graph again) on another fresh deepcopy, with ``MagnitudeImportance(p=1)`` (L1),
  ``pruning_ratio=0.3``, the 1000-way classifier ignored, ``round_to=num_heads`` for ViT
  (as Torch-Pruning's own torchvision example does), per-layer by default (``--tp-global``
  for global ranking, which is what oba_fx does);
* theirs, step: ``pruner.step()`` (importance + physical pruning).

Ratios ours/theirs: analysis = analyze_model / build_dependency; prune = (scores + prune) /
step (both include computing the L1 importance); total = (analysis + scores + prune) /
(build_dependency + step). The pruner construction is printed but counted in no ratio: it
re-does the dependency graph that ``build_dependency`` already timed.

It also checks that each pruned model runs on the input (output shape unchanged and finite) and
reports the remaining FLOPs fraction: ours from ``out.meta["oba"]`` (oba_fx's own counter,
multiply-accumulates), theirs from ``tp.utils.count_ops_and_params``; the column "ours (tp
counter)" applies Torch-Pruning's counter to our result as a cross-check of the two counters.

Torch-Pruning is optional (``pip install --no-deps torch-pruning``, the ``bench`` extra); without
it only our side is timed.

With ``--zoo`` it times only the analysis (``analyze_model`` against ``build_dependency``) over
every torchvision classification model, warm and/or cold (``benchmarks/analysis_zoo.py``), and
writes a ratio table (``--md``) and the measurements (``--json``).

Usage:
    python benchmarks/analysis_speed.py                       # all five models, 3 runs each
    python benchmarks/analysis_speed.py --zoo --protocol both --runs 3 \
        --json benchmarks/results/analysis_speed.json --md benchmarks/results/analysis_speed.md
    python benchmarks/analysis_speed.py --models resnet50 --runs 5 --json out.json
    python benchmarks/analysis_speed.py --profile resnet50    # cProfile of analyze_model only
    python benchmarks/analysis_speed.py --profile resnet50 --profile-stage prune
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn as nn
import torchvision

MODELS = ("resnet50", "densenet121", "efficientnet_b0", "vit_b_16", "convnext_tiny")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def import_tp():
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    return tp


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def short(e: BaseException, n: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def runs_ok(model: nn.Module, x: torch.Tensor, ref_shape: tuple[int, ...]) -> tuple[bool, str]:
    """Whether ``model(x)`` runs and gives a finite output of the original shape."""
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return False, short(e)
    if not isinstance(y, torch.Tensor):
        return False, f"output is {type(y).__name__}"
    if tuple(y.shape) != ref_shape:
        return False, f"output shape {tuple(y.shape)} != {ref_shape}"
    if not torch.isfinite(y).all():
        return False, "non-finite output"
    return True, ""


def tp_macs(tp, model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, x)
    return int(macs)


# ----------------------------------------------------------------------------------------- ours
def time_ours(model: nn.Module, x: torch.Tensor, ratio: float, runs: int) -> dict[str, Any]:
    from oba_fx.scoring import score
    from oba_fx.passes.pipeline import analyze_model, prune
    from oba_fx.select import Target

    res: dict[str, Any] = {"analysis_s": [], "scores_s": [], "prune_s": []}
    out = None
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            gm = analyze_model(model, (x,))
            t1 = time.perf_counter()
            scores = score(gm, None, criterion="l1")
            t2 = time.perf_counter()
            out = prune(gm, (x,), scores, Target("channels", ratio), verify=False)
            t3 = time.perf_counter()
            res["analysis_s"].append(t1 - t0)
            res["scores_s"].append(t2 - t1)
            res["prune_s"].append(t3 - t2)
    except Exception as e:  # noqa: BLE001
        res["error"] = short(e)
        traceback.print_exc(file=sys.stderr)
        return res
    rep = out.meta["oba"]
    res["flops_frac"] = rep["flops_after"] / rep["flops_before"]
    res["params_frac"] = rep["params_after"] / rep["params_before"]
    res["units_removed"], res["units_prunable"] = rep["units_removed"], rep["units_prunable"]
    res["runs"], res["run_error"] = runs_ok(out, x, res_shape(model, x))
    res["module"] = out
    return res


_SHAPES: dict[int, tuple[int, ...]] = {}


def res_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    if id(model) not in _SHAPES:
        with torch.no_grad():
            _SHAPES[id(model)] = tuple(model(x).shape)
    return _SHAPES[id(model)]


# --------------------------------------------------------------------------------------- theirs
def tp_pruner(tp, model: nn.Module, x: torch.Tensor, ratio: float, global_pruning: bool):
    from torchvision.models.vision_transformer import VisionTransformer

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    round_to = model.encoder.layers[0].num_heads if isinstance(model, VisionTransformer) else None
    return tp.pruner.MetaPruner(
        model, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=global_pruning, pruning_ratio=ratio, iterative_steps=1,
        ignored_layers=ignored, round_to=round_to)


def tp_fixup(model: nn.Module) -> None:
    """torchvision's ViT keeps ``hidden_dim`` for reshaping; Torch-Pruning's example resets it."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels


def time_theirs(tp, model: nn.Module, x: torch.Tensor, ratio: float, runs: int,
                global_pruning: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"analysis_s": [], "pruner_init_s": [], "step_s": []}
    try:
        for _ in range(runs):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            tp.DependencyGraph().build_dependency(m, example_inputs=x)
            res["analysis_s"].append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        res["analysis_error"] = short(e)
        traceback.print_exc(file=sys.stderr)
    pruned = None
    try:
        for _ in range(runs):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            pruner = tp_pruner(tp, m, x, ratio, global_pruning)
            t1 = time.perf_counter()
            pruner.step()
            t2 = time.perf_counter()
            tp_fixup(m)
            res["pruner_init_s"].append(t1 - t0)
            res["step_s"].append(t2 - t1)
            pruned = m
    except Exception as e:  # noqa: BLE001
        res["prune_error"] = short(e)
        traceback.print_exc(file=sys.stderr)
        return res
    res["runs"], res["run_error"] = runs_ok(pruned, x, res_shape(model, x))
    try:
        res["flops_frac"] = tp_macs(tp, pruned, x) / tp_macs(tp, model, x)
        res["params_frac"] = (sum(p.numel() for p in pruned.parameters())
                              / sum(p.numel() for p in model.parameters()))
    except Exception as e:  # noqa: BLE001
        res["flops_error"] = short(e)
    return res


# ---------------------------------------------------------------------------------------- table
def fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(name: str, ours: dict, theirs: dict | None, tp_counter_ours: float | None) -> dict:
    oa, osc, op = (median(ours.get(k, [])) for k in ("analysis_s", "scores_s", "prune_s"))
    row: dict[str, Any] = {"model": name, "ours_analysis_s": oa, "ours_scores_s": osc, "ours_prune_s": op,
                           "ours_error": ours.get("error"), "ours_runs": ours.get("runs"),
                           "ours_run_error": ours.get("run_error") or None,
                           "ours_flops_frac": ours.get("flops_frac"), "ours_params_frac": ours.get("params_frac"),
                           "ours_flops_frac_tp_counter": tp_counter_ours,
                           "ours_times": {k: ours.get(k) for k in ("analysis_s", "scores_s", "prune_s")}}
    ours_prune = osc + op if osc is not None and op is not None else None
    ours_total = oa + ours_prune if oa is not None and ours_prune is not None else None
    row["ours_total_s"] = ours_total
    if theirs is not None:
        ta, ti, ts = (median(theirs.get(k, [])) for k in ("analysis_s", "pruner_init_s", "step_s"))
        row.update({"tp_analysis_s": ta, "tp_pruner_init_s": ti, "tp_step_s": ts,
                    "tp_total_s": ta + ts if ta is not None and ts is not None else None,
                    "tp_analysis_error": theirs.get("analysis_error"), "tp_prune_error": theirs.get("prune_error"),
                    "tp_runs": theirs.get("runs"), "tp_run_error": theirs.get("run_error") or None,
                    "tp_flops_frac": theirs.get("flops_frac"), "tp_params_frac": theirs.get("params_frac"),
                    "tp_flops_error": theirs.get("flops_error"),
                    "tp_times": {k: theirs.get(k) for k in ("analysis_s", "pruner_init_s", "step_s")}})
        row["ratio_analysis"] = ratio(oa, ta)
        row["ratio_prune"] = ratio(ours_prune, ts)
        row["ratio_total"] = ratio(ours_total, row["tp_total_s"])
    return row


def print_tables(rows: list[dict], have_tp: bool) -> None:
    hdr = ["model", "ours analysis", "ours l1", "ours prune", "ours total"]
    if have_tp:
        hdr += ["TP build_dep", "TP pruner init", "TP step", "TP total", "x analysis", "x prune", "x total"]
    lines = [hdr]
    for r in rows:
        line = [r["model"], fmt(r["ours_analysis_s"], suffix="s"), fmt(r["ours_scores_s"], suffix="s"),
                fmt(r["ours_prune_s"], suffix="s"), fmt(r["ours_total_s"], suffix="s")]
        if have_tp:
            line += [fmt(r["tp_analysis_s"], suffix="s"), fmt(r["tp_pruner_init_s"], suffix="s"),
                     fmt(r["tp_step_s"], suffix="s"), fmt(r["tp_total_s"], suffix="s"),
                     fmt(r["ratio_analysis"], suffix="x"), fmt(r["ratio_prune"], suffix="x"),
                     fmt(r["ratio_total"], suffix="x")]
        lines.append(line)
    _print(lines)
    print()
    hdr = ["model", "ours runs", "ours FLOPs kept", "ours params kept"]
    if have_tp:
        hdr += ["ours FLOPs kept (tp counter)", "TP runs", "TP FLOPs kept", "TP params kept"]
    lines = [hdr]
    for r in rows:
        line = [r["model"], _ok(r["ours_runs"], r["ours_error"] or r["ours_run_error"]),
                fmt(r["ours_flops_frac"], ".3f"), fmt(r["ours_params_frac"], ".3f")]
        if have_tp:
            line += [fmt(r["ours_flops_frac_tp_counter"], ".3f"),
                     _ok(r["tp_runs"], r["tp_prune_error"] or r["tp_run_error"]),
                     fmt(r["tp_flops_frac"], ".3f"), fmt(r["tp_params_frac"], ".3f")]
        lines.append(line)
    _print(lines)
    notes = []
    for r in rows:
        for key in ("ours_error", "ours_run_error", "tp_analysis_error", "tp_prune_error", "tp_run_error",
                    "tp_flops_error"):
            if r.get(key):
                notes.append(f"  {r['model']}: {key.replace('_error', '')} failed: {r[key]}")
    if notes:
        print("\nfailures:")
        print("\n".join(notes))


def _ok(flag: bool | None, err: str | None) -> str:
    if flag:
        return "yes"
    return "failed" if err else "-"


def _print(lines: list[list[str]]) -> None:
    w = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    for j, l in enumerate(lines):
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(l)))
        if j == 0:
            print("  ".join("-" * n for n in w))


# -------------------------------------------------------------------------------------- profile
def profile(name: str, stage: str = "analysis", top: int = 10) -> None:
    """cProfile one ``analyze_model`` (stage "analysis") or one ``prune`` (stage "prune") call and
    print the ``top`` oba_fx functions by cumulative time."""
    from oba_fx.scoring import score
    from oba_fx.passes.pipeline import analyze_model, prune
    from oba_fx.select import Target

    model, x = build(name), torch.randn(1, 3, 224, 224)
    analyze_model(model, (x,))  # warm-up (imports, caches)
    gm = analyze_model(model, (x,)) if stage == "prune" else None
    scores = score(gm, None, criterion="l1") if gm is not None else None
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    if stage == "prune":
        prune(gm, (x,), scores, Target("channels", 0.3), verify=False)
    else:
        analyze_model(model, (x,))
    pr.disable()
    call = "prune" if stage == "prune" else "analyze_model"
    print(f"{call}({name}) under cProfile: {time.perf_counter() - t0:.2f}s")
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s).sort_stats("cumulative")
    st.print_stats(r"oba_fx|/passes/", top)
    print(s.getvalue())


def zoo_meta(a: argparse.Namespace, tp) -> dict[str, Any]:
    from _common import machine

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": a.threads,
            "runs": a.runs, "tp": None if tp is None else getattr(tp, "__version__", "?"),
            "machine": "2-core shared CPU", "date": time.strftime("%Y-%m-%d"), "protocol": a.protocol,
            "host": machine(), "cold_clock": a.clock, "cold_repeats": a.cold_repeats}


def write_zoo(a: argparse.Namespace, rows: list[dict], tp) -> None:
    import analysis_zoo as Z

    meta = zoo_meta(a, tp)
    if a.md:
        with open(a.md, "w") as f:
            f.write(Z.markdown(rows, meta))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def cold_pairs(a: argparse.Namespace, name: str, sides: tuple[str, ...]) -> dict[str, Any]:
    """``--cold-repeats`` first calls per side, each in a fresh process, the sides alternating
    which goes first; the median per side (and every run, with more than one)."""
    import analysis_zoo as Z

    runs: dict[str, list[float]] = {s: [] for s in sides}
    row: dict[str, Any] = {}
    for i in range(a.cold_repeats):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            s, err = Z.cold(side, name, a.threads, __file__, a.clock)
            if err:
                row[f"{side}_cold_error"] = err
            elif s is not None:
                runs[side].append(s)
    for side, xs in runs.items():
        row[f"{side}_cold_s"] = statistics.median(xs) if xs else None
        if a.cold_repeats > 1:
            row[f"{side}_cold_runs"] = xs
    return row


def run_zoo(a: argparse.Namespace) -> int:
    """Analysis only over the zoo (``benchmarks/analysis_zoo.py``): warm and/or cold, both sides."""
    import analysis_zoo as Z

    tp = None if a.no_tp else import_tp()
    names = a.models if a.models != list(MODELS) else Z.zoo()
    first = [n for n in (a.first or []) if n in names]
    names = first + [n for n in names if n not in first]
    cold_names = set(a.cold_models or names)
    rows = []
    for name in names:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"model": name}
        if a.protocol in ("warm", "both"):
            row.update(Z.warm(tp, name, a.runs))
        if a.protocol in ("cold", "both") and name in cold_names:
            row.update(cold_pairs(a, name, ("ours",) + (("tp",) if tp is not None else ())))
        rows.append(row)
        print(f"[{name}] {json.dumps({k: v for k, v in row.items() if not k.endswith('runs')}, default=str)}",
              file=sys.stderr, flush=True)
        write_zoo(a, rows, tp)  # after every model: a long run stopped early keeps what it measured
    print(Z.markdown(rows, zoo_meta(a, tp)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                   help=f"torchvision model names (default: {' '.join(MODELS)})")
    p.add_argument("--runs", "-n", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--ratio", type=float, default=0.3, help="channel ratio removed (both tools)")
    p.add_argument("--tp-global", action="store_true",
                   help="Torch-Pruning with global_pruning=True (default: per-layer, as its torchvision example)")
    p.add_argument("--no-tp", action="store_true", help="time only oba_fx")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", metavar="OUT", help="also write the measurements to this JSON file")
    p.add_argument("--profile", metavar="NAME",
                   help="instead: cProfile one call on this model, top 10 oba_fx functions by cumulative time")
    p.add_argument("--profile-stage", choices=("analysis", "prune"), default="analysis",
                   help="what --profile profiles: analyze_model (default) or prune (select + slim)")
    p.add_argument("--zoo", action="store_true",
                   help="instead: analysis only, every torchvision classification model (or --models)")
    p.add_argument("--protocol", choices=("warm", "cold", "both"), default="warm",
                   help="--zoo: warm (one process, warm-up then median), cold (first call, fresh process) or both")
    p.add_argument("--cold-models", nargs="+", metavar="NAME",
                   help="--zoo --protocol both: time cold only these models (default: all)")
    p.add_argument("--cold-repeats", type=int, default=1, metavar="N",
                   help="--zoo: N cold calls per side and model, alternating which side goes first; median")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="--zoo cold: wall-clock seconds, or the process's CPU seconds over the same call")
    p.add_argument("--first", nargs="+", metavar="NAME", help="--zoo: time these models first")
    p.add_argument("--md", metavar="OUT", help="--zoo: write the ratio table (Markdown) to this file")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "NAME"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    if a.child:
        from analysis_zoo import child
        child(a.child[0], a.child[1], a.threads)
        return 0
    if a.zoo:
        return run_zoo(a)

    if a.profile:
        profile(a.profile, a.profile_stage)
        return 0

    tp = None if a.no_tp else import_tp()
    mode = "global" if a.tp_global else "per-layer"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, median of {a.runs} runs, channel ratio {a.ratio}, "
          "criterion l1, input 1x3x224x224")
    if tp is None:
        print("NOTE: Torch-Pruning is not installed (pip install --no-deps torch-pruning); timing oba_fx only."
              if not a.no_tp else "NOTE: --no-tp; timing oba_fx only.")
    else:
        print(f"Torch-Pruning {getattr(tp, '__version__', '?')}: MetaPruner + MagnitudeImportance(p=1), "
              f"pruning_ratio={a.ratio}, {mode} pruning, 1000-way classifier ignored, round_to=num_heads for ViT")
    print()

    rows = []
    for name in a.models:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        model, x = build(name), torch.randn(1, 3, 224, 224)
        res_shape(model, x)
        ours = time_ours(model, x, a.ratio, a.runs)
        theirs = time_theirs(tp, model, x, a.ratio, a.runs, a.tp_global) if tp is not None else None
        tp_counter_ours = None
        if tp is not None and "module" in ours:
            try:
                tp_counter_ours = tp_macs(tp, ours["module"], x) / tp_macs(tp, model, x)
            except Exception as e:  # noqa: BLE001
                print(f"[{name}] tp counter on our result failed: {short(e)}", file=sys.stderr)
        rows.append(summarise(name, ours, theirs, tp_counter_ours))
        print(f"[{name}] done: ours {fmt(rows[-1]['ours_total_s'])}s"
              + (f", TP {fmt(rows[-1]['tp_total_s'])}s" if theirs is not None else ""), file=sys.stderr, flush=True)

    print_tables(rows, tp is not None)
    if tp is not None:
        print("\nx = ours/theirs (below 1: ours faster). analysis: analyze_model / build_dependency; prune: "
              "(l1 scores + prune) / pruner.step(); total: sum of those. 'TP pruner init' (which rebuilds the "
              "dependency graph) is in no ratio. FLOPs kept: ours from out.meta['oba'], TP from "
              "tp.utils.count_ops_and_params (MACs).")
    if a.json:
        meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": a.threads,
                "runs": a.runs, "ratio": a.ratio, "tp": None if tp is None else getattr(tp, "__version__", "?"),
                "tp_mode": mode if tp is not None else None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
