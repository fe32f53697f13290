"""Transformers from torchvision (random weights, 224x224): prune heads and MLP neurons.

For each model and criterion, ``oba_fx.prune_graph(model, x, criterion, target_flops=R)`` with
``--calib`` synthetic calibration batches (random images and labels: this measures the mechanics,
not accuracy), then reports the wall time of the call, the retained FLOPs and parameters, the
heads kept per attention block, the largest deviation from the masked original, and the CPU
latency speedup of the slimmed model over the dense one (median of interleaved timed forward
passes of one batch in the same process).

Usage::

    python benchmarks/transformers.py [--models vit_b_16 swin_t convnext_tiny maxvit_t]
        [--criteria l1 oba] [--ratio 0.7] [--calib 1] [--batch 2] [--threads 2] [--out benchmarks/results]

Writes ``transformers.json`` and ``transformers.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import torchvision

import oba_fx
from oba_fx.criteria import get_criterion

log = logging.getLogger("transformers")


def latency(dense, slim, x, runs: int = 5) -> float:
    """Median dense / slimmed forward time, runs interleaved."""
    td, ts = [], []
    with torch.no_grad():
        for m in (dense, slim):
            m(x)
        for _ in range(runs):
            for m, acc in ((dense, td), (slim, ts)):
                t = time.perf_counter()
                m(x)
                acc.append(time.perf_counter() - t)
    return statistics.median(td) / statistics.median(ts)


def heads_summary(heads: dict[str, list[int]]) -> str:
    if not heads:
        return "no attention"
    before = sum(b for b, _ in heads.values())
    after = sum(a for _, a in heads.values())
    per = " ".join(str(a) for _, a in heads.values())
    return f"{after}/{before} kept; per block: {per}"


def run_one(name: str, criterion: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(name).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, 3, 224, 224, generator=gen)
    data = [(torch.randn(args.batch, 3, 224, 224, generator=gen), torch.randint(0, 1000, (args.batch,), generator=gen))
            for _ in range(args.calib)]
    t = time.perf_counter()
    out = oba_fx.prune_graph(model, x, criterion=criterion, target_flops=args.ratio,
                             data=data if get_criterion(criterion).needs_data else None, verbose=False,
                             compensate=False)  # synthetic data: measure the mechanics only
    wall = time.perf_counter() - t
    r = out.meta["oba"]
    return {"model": name, "criterion": criterion, "seconds": round(wall, 1),
            "flops": r["flops_after"] / r["flops_before"], "params": r["params_after"] / r["params_before"],
            "max_rel_error": r["max_rel_error"], "barriers": len(r["barriers"]), "heads": r["heads"],
            "speedup": latency(model, out.eval(), torch.randn(args.batch, 3, 224, 224, generator=gen))}


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [f"Retained-FLOPs target {settings['ratio']}, {settings['calib']} synthetic calibration batch(es) of "
             f"{settings['batch']}, {settings['threads']} thread(s), {settings['date']} ({settings['machine']}).", "",
             "| model | criterion | time (s) | FLOPs kept | params kept | max rel. error | CPU speedup | heads |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['criterion']} | {r['seconds']} | {r['flops']:.3f} | {r['params']:.3f} | "
                     f"{r['max_rel_error']:.1e} | {r['speedup']:.2f}x | {heads_summary(r['heads'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_b_16", "swin_t", "convnext_tiny", "maxvit_t"])
    p.add_argument("--criteria", nargs="+", default=["l1", "oba"])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--calib", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    import platform

    settings = {**vars(args), "date": _dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "torchvision": torchvision.__version__}
    rows = []
    for name in args.models:
        for crit in args.criteria:
            log.info("%s / %s", name, crit)
            rows.append(run_one(name, crit, args))
            log.info("%s", rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformers.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    md = markdown(rows, settings)
    (out / "transformers.md").write_text(md)
    print(md)  # noqa: T201  (a benchmark script prints its table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
