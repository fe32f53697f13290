"""Where the analysis time goes: CPU time of each stage of ``analyze_model(..., share_weights=True)``
next to Torch-Pruning's ``build_dependency``, per torchvision model.

Stages (each the minimum over ``--runs`` runs, ``time.process_time``, so that other processes on
a shared machine count less than in wall time): the module copy, the symbolic trace, the
GraphModule, shape propagation, coupling; ``all`` is one whole ``analyze_model`` call (checks,
attention lowering and pass bookkeeping included), ``tp`` one ``build_dependency`` on a fresh
deep copy (skipped without torch-pruning).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/analysis_stages.py mnasnet0_5 regnet_x_400mf --runs 7
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from typing import Any, Callable

import torch

from analysis_zoo import build


def cpu(f: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of ``f()`` after a garbage collection, and its result."""
    gc.collect()
    t = time.process_time()
    out = f()
    return time.process_time() - t, out


def stages(name: str, runs: int, tp: Any) -> dict[str, float]:
    """Minimum CPU milliseconds of each stage over ``runs`` runs (after one untimed run)."""
    from oba_fx import tracing
    from oba_fx.module_copy import deepcopy_modules
    from oba_fx.passes.coupling import CouplingPass
    from oba_fx.passes.pipeline import analyze_model
    from oba_fx.passes.shape_prop import ShapePropPass

    model, x = build(name)
    best: dict[str, float] = {}
    for i in range(runs + 1):
        t = {}
        t["copy"], root = cpu(lambda: deepcopy_modules(model, {id(p): p for p in [*model.parameters(),
                                                                              *model.buffers()]}))
        tracer = tracing.LeafTracer(())
        t["trace"], graph = cpu(lambda: tracer.trace(root))
        t["graphmodule"], gm = cpu(lambda: tracing.graph_module(tracer.root, graph, "M", lazy=True))
        t["shapes"], _ = cpu(lambda: ShapePropPass((x,))(gm))
        t["coupling"], _ = cpu(lambda: CouplingPass()(gm))
        t["all"], _ = cpu(lambda: analyze_model(model, (x,), share_weights=True))
        if tp is not None:
            theirs = copy.deepcopy(model)
            t["tp"], _ = cpu(lambda: tp.DependencyGraph().build_dependency(theirs, example_inputs=x))
        if i:  # the first run warms up
            for k, v in t.items():
                best[k] = min(best.get(k, v), v)
    return {k: v * 1e3 for k, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--no-tp", action="store_true", help="time only oba_fx")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    tp = None
    if not a.no_tp:
        try:
            import torch_pruning as tp
        except ImportError:
            pass
    for name in a.models:
        r = stages(name, a.runs, tp)
        ratio = f"  all/tp={r['all'] / r['tp']:.2f}" if "tp" in r else ""
        print(f"{name:22s} " + " ".join(f"{k}={v:.1f}" for k, v in r.items()) + " ms" + ratio, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
