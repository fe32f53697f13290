"""Structured CAMP with and without curvature-adaptive per-layer thresholds (``ranking="curvature"``).

One power iteration (the ``"camp"`` criterion, ``--hessian``) on ``--calib`` training images drawn
with ``--seed`` scores the pretrained ResNet; the same scores are then pruned one-shot to
``--ratio`` of the FLOPs under each ranking of ``--rankings``, with the library defaults
(residual streams kept, least-squares compensation of every conv / linear, no BN
recalibration), and verified. Accuracy on the 1,000 exact test images.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/camp_curvature.py --data DIR [--model resnet20] [--ratio 0.5]
        [--rankings group_max curvature] [--calib 512] [--seed 0] [--hessian functional]

Writes ``benchmarks/results/camp_curvature.json`` (rewritten after every run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from oba_fx.api import COMPENSATION_DEFAULTS
from oba_fx.evaluate import evaluate
from oba_fx.passes import CompensatePass, ScorePass
from oba_fx.passes.pipeline import analyze_model, prune
from oba_fx.select import Target
from ranking import WEIGHTS, pretrained_setup


def kept_fractions(report: dict, model) -> dict:
    """Kept fraction of every pruned conv's output channels."""
    return {name: round(len(dims[0]) / model.get_parameter(name).shape[0], 3)
            for name, dims in sorted(report["kept"].items()) if name.endswith("weight") and 0 in dims}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--model", default="resnet20", choices=sorted(WEIGHTS))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rankings", nargs="+", default=["group_max", "curvature"])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian", default="functional", choices=["functional", "full"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/camp_curvature.json")
    a = p.parse_args()
    test, model, calib, res = pretrained_setup(a.data, a.model, a.calib, a.seed, a)
    example = (calib[0][0][:1],)
    t0 = time.perf_counter()
    scored = analyze_model(model, example)
    ScorePass("camp", calib, progress=False, hessian=a.hessian, seed=a.seed)(scored)
    scores = scored.meta["oba.scores"]
    res["score_seconds"] = round(time.perf_counter() - t0, 1)
    for ranking in a.rankings:
        t0 = time.perf_counter()
        gm = analyze_model(model, example)
        comp = CompensatePass(calib, progress=False, **COMPENSATION_DEFAULTS)
        out = prune(gm, example, dict(scores), Target("flops", a.ratio, ranking=ranking, keep_summed=True),
                    compensate=comp)
        r = out.meta["oba"]
        row = {"ranking": ranking, "flops": r["flops_after"] / r["flops_before"], "max_rel_error": r["max_rel_error"],
               "seconds": round(time.perf_counter() - t0, 1), "exact1k": evaluate(out, test),
               "kept": kept_fractions(r, model), "spread": float(np.std(list(kept_fractions(r, model).values())))}
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kept"}), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
