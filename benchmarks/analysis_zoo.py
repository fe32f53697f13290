"""Analysis time of oba_fx against Torch-Pruning's ``build_dependency`` over the torchvision zoo.

Both sides analyse the same model (random weights, eval mode, batch-1 input 1x3x224x224) with
the same number of threads:

* ours:   ``oba_fx.passes.pipeline.analyze_model(model, (x,), share_weights=True)``: trace of a
  copy whose modules are new and whose weights are the model's (what ``oba_fx.explain`` runs;
  ``prune_graph`` also copies the weights, which costs about one ``copy.deepcopy(model)``),
  shape propagation, element-level coupling; the Hessian block structure is computed only when
  asked, and is not timed;
* theirs: ``tp.DependencyGraph().build_dependency(m, example_inputs=x)`` on a deep copy ``m``
  made before the clock starts (their analysis modifies nothing, but it registers hooks).

Two protocols, each side timed the same way:

* ``warm``: in one process, one untimed call of each side, then ``runs`` calls of each side
  alternating (ours, theirs, ours, ...) with ``gc.collect()`` before every call; the median.
* ``cold``: the first call in a fresh Python process, one process per side and model (imports
  and building the model are not timed; the call is).

Run through ``python benchmarks/analysis_speed.py --zoo`` (see there).
"""

from __future__ import annotations

import copy
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torchvision

SIZE = 224


def zoo() -> list[str]:
    """Every torchvision classification model."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval(), torch.randn(1, 3, SIZE, SIZE)


def ours_call(model: torch.nn.Module, x: torch.Tensor, cpu: list | None = None) -> float:
    """Seconds of one ``analyze_model`` call (wall clock); its process CPU seconds appended to ``cpu``."""
    from oba_fx.passes.pipeline import analyze_model

    return _timed(lambda: analyze_model(model, (x,), share_weights=True), cpu)


def theirs_call(tp, model: torch.nn.Module, x: torch.Tensor, cpu: list | None = None) -> float:
    """Seconds of one ``build_dependency`` call on a fresh copy (wall clock); CPU seconds to ``cpu``."""
    m = copy.deepcopy(model)
    return _timed(lambda: tp.DependencyGraph().build_dependency(m, example_inputs=x), cpu)


def _timed(call, cpu: list | None) -> float:
    """Wall seconds of ``call()`` after a garbage collection; its process CPU seconds appended to ``cpu``."""
    gc.collect()
    c, t = time.process_time(), time.perf_counter()
    call()
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def warm(tp, name: str, runs: int) -> dict[str, Any]:
    """Warm protocol for one model: medians of ``runs`` alternating calls after one warm-up each."""
    model, x = build(name)
    sides = {"ours": lambda: ours_call(model, x)}
    if tp is not None:
        sides["tp"] = lambda: theirs_call(tp, model, x)
    times: dict[str, list[float]] = {k: [] for k in sides}
    row: dict[str, Any] = {}
    for k, f in sides.items():
        try:
            f()
        except Exception as e:  # noqa: BLE001 - reported in the table
            row[f"{k}_error"] = _short(e)
    for _ in range(runs):
        for k, f in sides.items():
            if f"{k}_error" not in row:
                times[k].append(f())
    for k in sides:
        row[f"{k}_warm_s"] = statistics.median(times[k]) if times[k] else None
        row[f"{k}_warm_runs"] = times[k]
    return row


def child(side: str, name: str, threads: int) -> None:
    """Cold protocol, inside the fresh process: print ``{"s": seconds}`` of the first call."""
    torch.set_num_threads(threads)
    if side == "tp":
        import torch_pruning as tp
    else:
        import oba_fx.passes.pipeline  # noqa: F401 - imported before the clock, as torch_pruning
    model, x = build(name)
    try:
        cpu: list = []
        s = theirs_call(tp, model, x, cpu) if side == "tp" else ours_call(model, x, cpu)
        print(json.dumps({"s": s, "cpu": cpu[0]}))
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": _short(e)}))


def cold(side: str, name: str, threads: int, script: str, clock: str = "wall") -> tuple[float | None, str | None]:
    """First call of ``side`` on ``name`` in a fresh process: wall-clock seconds, or with
    ``clock="cpu"`` the process's CPU seconds over the same call (less disturbed by other jobs on
    a shared machine)."""
    p = subprocess.run([sys.executable, script, "--child", side, name, "--threads", str(threads)],
                       capture_output=True, text=True, timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode or not lines:
        return None, (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
    r = json.loads(lines[-1])
    return r.get("cpu" if clock == "cpu" else "s"), r.get("error")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def markdown(rows: list[dict], meta: dict) -> str:
    """The ratio table (below 1: ours faster)."""
    f = lambda v, s="s": "-" if v is None else f"{v:.2f}{s}"  # noqa: E731
    out = [f"Analysis time, ours (`analyze_model`) vs Torch-Pruning {meta['tp']} (`build_dependency`), "
           f"torch {meta['torch']}, {meta['threads']} thread(s), input 1x3x{SIZE}x{SIZE}, {meta['machine']}, "
           f"{meta['date']}; {len(rows)} of the {len(zoo())} torchvision classification models. warm: median of {meta['runs']} alternating calls after one warm-up each; "
           f"cold: first call in a fresh process ({meta.get('cold_clock', 'wall')} clock, median of "
           f"{meta.get('cold_repeats', 1)} alternating pair(s)). x = ours / theirs (below 1: ours faster).", "",
           "| model | ours warm | TP warm | x warm | ours cold | TP cold | x cold |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {f(r.get('ours_warm_s'))} | {f(r.get('tp_warm_s'))} | "
                   f"{f(ratio(r.get('ours_warm_s'), r.get('tp_warm_s')), 'x')} | {f(r.get('ours_cold_s'))} | "
                   f"{f(r.get('tp_cold_s'))} | {f(ratio(r.get('ours_cold_s'), r.get('tp_cold_s')), 'x')} |")
    for proto in ("warm", "cold"):
        xs = [ratio(r.get(f"ours_{proto}_s"), r.get(f"tp_{proto}_s")) for r in rows]
        xs = [x for x in xs if x is not None]
        if xs:
            out.append(f"\n{proto}: {len(xs)} models timed on both sides; ours faster on {sum(x < 1 for x in xs)}; "
                       f"ratio median {statistics.median(xs):.2f}x, worst {max(xs):.2f}x, best {min(xs):.2f}x.")
    errs = [f"- {r['model']}: {k.replace('_error', '')} failed: {r[k]}" for r in rows for k in sorted(r)
            if k.endswith("_error") and r[k]]
    if errs:
        out += ["", "Failures:"] + errs
    return "\n".join(out) + "\n"
