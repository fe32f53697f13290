"""Multi-step pruning: does compensating toward the original dense network beat chaining?

On a pretrained CIFAR ResNet, one criterion and one retained-FLOPs target, with ``--calib``
training images drawn with ``--seed`` (batches of 64): one-shot, ``--steps`` steps compensating
each step toward the previous step's network (``toward="previous"``, the old behaviour) and
``--steps`` steps compensating toward the dense network's layer outputs (``toward="dense"``, the
default). Accuracy on the 1,000 exact test images.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/steps_compensation.py --data DIR [--model resnet56]
        [--criterion l1] [--ratio 0.5] [--steps 3] [--calib 512] [--seed 0]

Writes ``benchmarks/results/steps_compensation.json`` (rewritten after every run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


import oba_fx
from oba_fx.evaluate import evaluate
from ranking import WEIGHTS, pretrained_setup


def run(model, calib, test, criterion: str, ratio: float, steps: int, toward: str) -> dict:
    t0 = time.perf_counter()
    out = oba_fx.prune_graph(model, calib[0][0][:1], criterion=criterion, data=calib, target_flops=ratio, steps=steps,
                             compensate={"toward": toward}, verbose=False)
    r = out.meta["oba"]
    return {"steps": steps, "toward": toward, "steps_run": r.get("steps", 1),
            "flops": r["flops_after"] / r["flops_before"], "seconds": round(time.perf_counter() - t0, 1),
            "exact1k": evaluate(out, test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--criterion", default="l1")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/steps_compensation.json")
    a = p.parse_args()
    test, model, calib, res = pretrained_setup(a.data, a.model, a.calib, a.seed, a)
    for steps, toward in ((1, "dense"), (a.steps, "previous"), (a.steps, "dense")):
        res["rows"].append(run(model, calib, test, a.criterion, a.ratio, steps, toward))
        print(json.dumps(res["rows"][-1]), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
