"""The directly generated fused HVP program on ``vit_cifar`` (transformers go through the generic
rule of :mod:`oba_fx.hvp_direct`): per-batch time next to the eager ``fused_hvp`` and one gradient.

Model: ``oba_fx.models.vit_cifar()`` at its default size (dim 128, depth 6, 4 heads, MLP 256),
random weights, eval mode, traced by oba_fx's tracer (``oba_fx.tracing``, as ``prune_graph``
does) so that the program is generated from the same graph the pipeline scores. Batches of
``--batch`` (64) random 3x32x32 images, ``--threads`` (1) torch threads.

Columns: median (and range) wall time over ``--runs`` rounds after one warm-up, the methods
interleaved round by round so machine load hits all alike; the program's one-off generation time
(median of ``--runs`` generations from the traced graph). "generic rule only": the same program
with the hand-written LayerNorm / GELU / attention rules switched off (``torch.func`` on each).

Usage:
    OMP_NUM_THREADS=1 python -m benchmarks.hvp_direct_vit --runs 7   # from the repository root
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from oba_fx.hvp import fused_hvp
from oba_fx.hvp_direct import _Generator, build_direct_program
from oba_fx.models.vit_cifar import vit_cifar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hvp_cost import time_all  # noqa: E402  (benchmarks/ is not a package)


def traced_vit() -> torch.nn.Module:
    """The default vit_cifar as the pipeline's tracer sees it."""
    from oba_fx.tracing import trace

    torch.manual_seed(0)
    return trace(vit_cifar().eval())


def gradient_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def grad() -> tuple:
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss = F.cross_entropy(functional_call(model, (leaves, buffers), (x,)), y)
        return torch.autograd.grad(loss, list(leaves.values()))
    return grad


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = traced_vit()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    gen_times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        prog = build_direct_program(model, hessian="functional", with_grad=False)
        gen_times.append(time.perf_counter() - t0)
    prog_g = build_direct_program(model, hessian="functional", with_grad=True)
    _Generator.transformer_rules = False
    prog_generic = build_direct_program(model, hessian="functional", with_grad=False)
    _Generator.transformer_rules = True
    fns = {"grad": gradient_fn(model, x, y),
           "program functional": lambda: prog(model, x, y),
           "program functional (+g)": lambda: prog_g(model, x, y),
           "program functional, generic rule only": lambda: prog_generic(model, x, y),
           "eager fused_hvp functional": lambda: fused_hvp(model, (x, y), hessian="functional")}
    times = time_all(fns, args.runs)
    base = statistics.median(times["grad"])
    out = {"batch": args.batch, "threads": args.threads, "runs": args.runs,
           "generation_s": statistics.median(gen_times), "methods": {}}
    print(f"vit_cifar default, batch {args.batch}, {args.threads} thread(s), median of {args.runs} interleaved runs")
    print(f"  program generation: {out['generation_s'] * 1e3:.1f} ms (median), program nodes {prog.stats['nodes']}")
    for k, v in times.items():
        med = statistics.median(v)
        out["methods"][k] = {"median_s": med, "min_s": min(v), "max_s": max(v), "x_grad": med / base}
        print(f"  {k:38s} {med * 1e3:8.1f} ms  ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})  {med / base:.2f}x grad")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
