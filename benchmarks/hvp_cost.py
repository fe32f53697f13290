"""Cost of exact second-order scores relative to one gradient (CPU, batch 64, 2 threads).

For each model (eval mode, random weights, CIFAR-sized 3x32x32 inputs, 10 classes) it measures

* ``grad``: one plain forward + backward (``torch.autograd.grad`` of the mean cross-entropy
  w.r.t. every parameter) — the unit of every ratio;
* ``fused functional`` / ``fused full``: :func:`oba_fx.hvp.fused_hvp` in eager mode (one dual
  forward and one backward: loss, gradient and ``H_F θ`` or ``H θ``);
* ``program functional (+g)`` / ``program functional`` / ``program full (+g)``: the generated,
  simplified FX program (:func:`oba_fx.hvp_program.build_hvp_program`), with and without the gradient
  as an output (``score(criterion="oba")`` with ``first_order=0`` needs none); its one-off
  build time (make_fx trace + simplification) is printed separately;
* ``torch.func jvp(grad)``: ``torch.func.jvp(torch.func.grad(loss), (θ,), (θ,))``, the generic
  forward-over-reverse HVP of the full Hessian (it also returns the gradient).

Columns: median wall time over ``--runs`` timed runs (after one warm-up; methods are
interleaved round by round, so machine load hits all of them alike); FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (deterministic, immune to load); and peak memory:
the increase of the process's peak resident set size (Linux ``VmHWM``, the counter behind
``resource.getrusage().ru_maxrss``, reset through ``/proc/self/clear_refs`` after a warm-up call
and ``malloc_trim``) over the RSS before one steady-state call, in a fresh subprocess per
(model, method) with the model, the batch (and the program) already set up. It counts everything
the call touches (activations, saved tensors, outputs, allocator slack, oneDNN scratch), so read
it to about ±10 MB.

Models: a small CNN (defined here), the thin CIFAR ResNet-56 and VGG19-BN (from
``oba_fx.models.get_model`` when available), and a small ViT for 32x32 inputs (defined here:
patch 4, width 192, depth 6, 3 heads, MLP 384; attention written out with ``softmax``).

``--all-in``: the cost of ``oba_fx.score(criterion="oba")`` everything included (the program
cache emptied first, so analysis, program generation and every batch are counted) over
``--batches`` calibration batches of 64 with a batch-1 ``example_inputs``, next to the per-batch
cost of the program, both as multiples of that many plain gradients timed in the same run
(gradient and scoring interleaved, ``--runs`` repetitions; median and range).

Usage:
    python benchmarks/hvp_cost.py --all-in --models resnet56 --batches 16 --runs 3
    python benchmarks/hvp_cost.py                        # all models, 5 runs
    python benchmarks/hvp_cost.py --models small_cnn vit_small --runs 3 --no-memory
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from oba_fx.hvp import fused_hvp
from oba_fx.hvp_program import build_hvp_program

BATCH = 64
THREADS = 2

# ------------------------------------------------------------------------------------ models


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(i: int, o: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 128, 2), block(128, 128, 1))
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SmallViT(nn.Module):
    def __init__(self, dim: int = 192, depth: int = 6, heads: int = 3, mlp: int = 384, patch: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (32 // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_model(name: str) -> nn.Module | None:
    torch.manual_seed(0)
    if name == "small_cnn":
        return SmallCNN()
    if name == "vit_small":
        return SmallViT()
    try:
        from oba_fx.models import get_model
    except ImportError:
        return None
    registry = {"resnet56": "resnet56", "vgg19_bn": "vgg19_bn_cifar"}
    try:
        return get_model(registry[name])
    except (ValueError, KeyError):
        return None


MODELS = ("small_cnn", "resnet56", "vgg19_bn", "vit_small")

# ----------------------------------------------------------------------------------- methods


def setup(model_name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = build_model(model_name)
    if model is None:
        raise LookupError(model_name)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    return model, x, y


PROGRAMS = (("program functional (+g)", "functional", True), ("program functional", "functional", False),
            ("program full (+g)", "full", True))


def methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor, programs: tuple[str, ...] | None = None
            ) -> dict[str, Callable]:
    """name -> zero-argument callable; program builds (all, or those in ``programs``) happen here
    and are timed separately."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def grad_only():
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss = F.cross_entropy(functional_call(model, (leaves, buffers), (x,)), y)
        return torch.autograd.grad(loss, list(leaves.values()))

    def jvp_grad():
        f = torch.func.grad(lambda p: F.cross_entropy(functional_call(model, (p, buffers), (x,)), y))
        return torch.func.jvp(f, (params,), (params,))

    out: dict[str, Callable] = {
        "grad": grad_only,
        "fused functional": lambda: fused_hvp(model, (x, y), hessian="functional"),
        "fused full": lambda: fused_hvp(model, (x, y), hessian="full"),
    }
    for label, hessian, with_grad in PROGRAMS:
        if programs is None or label in programs:
            t0 = time.perf_counter()
            prog = build_hvp_program(model, (x, y), hessian=hessian, with_grad=with_grad)
            BUILD_TIMES[label] = time.perf_counter() - t0
            out[label] = (lambda p: lambda: p(model, x, y))(prog)
    out["torch.func jvp(grad)"] = jvp_grad
    return out


BUILD_TIMES: dict[str, float] = {}


def flops(fn: Callable) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def time_all(fns: dict[str, Callable], runs: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(model_name: str, method: str) -> None:
    """Peak RSS increase (MB) of one steady-state call of one method, printed as JSON.

    After a warm-up call, freed heap memory is returned to the OS (``malloc_trim``), the kernel's
    peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and the baseline RSS read; the
    result is ``VmHWM − baseline`` around one more call (the same counter as
    ``resource.getrusage().ru_maxrss``, reset first so that earlier peaks do not hide this one).
    """
    torch.set_num_threads(THREADS)
    model, x, y = setup(model_name)
    fn = methods(model, x, y, programs=(method,))[method]
    fn()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024}))


def peak_memory(model_name: str, method: str) -> float | None:
    cmd = [sys.executable, __file__, "--worker", model_name, method]
    res = subprocess.run(cmd, capture_output=True, text=True)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["peak_mb"]
    logging.warning("memory worker failed for %s / %s: %s", model_name, method, res.stderr[-500:])
    return None


def all_in(model_name: str, n_batches: int, runs: int) -> dict:
    """All-in ``score(criterion="oba")`` vs ``n_batches`` gradients, interleaved, ``runs`` times.

    Each run times both sides (which goes first alternates) by wall clock (``all_in_x``) and by
    this process's CPU time over all its threads (``all_in_cpu_x``, ``time.process_time``): on a
    shared machine the wall-clock ratio moves with the other processes' load, the CPU-time ratio
    much less."""
    import oba_fx
    from oba_fx import hvp_cache

    model, _, _ = setup(model_name)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(n_batches)]
    names = [n for n, _ in model.named_parameters()]

    def grads() -> None:
        for x, y in data:
            leaves = [p.detach().requires_grad_() for p in model.parameters()]
            out = functional_call(model, (dict(zip(names, leaves)), dict(model.named_buffers())), (x,))
            torch.autograd.grad(F.cross_entropy(out, y), leaves)

    def score() -> None:
        hvp_cache.clear()
        oba_fx.score(model, data, example_inputs=(data[0][0][:1],), criterion="oba", progress=False)

    rows = []
    for run in range(runs):
        # alternate which side goes first, so a load change mid-run does not always favour one side
        first, second = (grads, score) if run % 2 == 0 else (score, grads)
        clocks = {}
        for f in (first, second):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            clocks[f] = (time.perf_counter() - t0, time.process_time() - c0)
        (t_grad, c_grad), (t_score, c_score) = clocks[grads], clocks[score]
        t0 = time.perf_counter()
        prog = hvp_cache.program_for(model, *data[0], names=names, hessian="functional", loss_fn=None,
                                     with_grad=False)
        t_lookup = time.perf_counter() - t0
        hvp_cache.clear()
        t0 = time.perf_counter()
        prog = hvp_cache.program_for(model, *data[0], names=names, hessian="functional", loss_fn=None,
                                     with_grad=False)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        prog(model, *data[0])
        t_batch = time.perf_counter() - t0
        g1 = t_grad / n_batches
        rows.append({"grad_s": g1, "score_all_in_s": t_score, "all_in_x": t_score / t_grad,
                     "all_in_cpu_x": c_score / c_grad, "score_first": run % 2 == 1,
                     "generation_s": t_gen, "generation_x_grad": t_gen / g1, "cache_lookup_s": t_lookup,
                     "program_batch_x_grad": t_batch / g1, "generator": prog.stats.get("generator", "make_fx")})
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
              flush=True)
    summary = {}
    for k in ("all_in_x", "all_in_cpu_x", "generation_x_grad", "program_batch_x_grad", "grad_s", "generation_s"):
        vals = [r[k] for r in rows]
        summary[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        print(f"  {k}: median {summary[k]['median']:.3f} (range {min(vals):.3f}-{max(vals):.3f})")
    return {"runs": rows, "summary": summary, "batches": n_batches}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per method (median reported)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--all-in", action="store_true", help="all-in score(criterion='oba') vs gradients (see above)")
    ap.add_argument("--batches", type=int, default=16, help="calibration batches for --all-in")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        worker(*args.worker)
        return
    torch.set_num_threads(THREADS)
    if args.all_in:
        results = {}
        for name in args.models:
            print(f"{name}: all-in score(criterion='oba'), {args.batches} batches of {BATCH}, batch-1 example, "
                  f"{THREADS} threads, {args.runs} runs (gradients timed in the same run)", flush=True)
            results[name] = all_in(name, args.batches, args.runs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, CPU, eval mode; "
          f"time = median of {args.runs} (interleaved), memory = peak-RSS increase of a steady-state "
          f"call in a fresh process (VmHWM reset)")
    results = {}
    for name in args.models:
        try:
            model, x, y = setup(name)
        except LookupError:
            print(f"\n{name}: not available (oba_fx.models.get_model), skipped")
            continue
        BUILD_TIMES.clear()
        fns = methods(model, x, y)
        times = time_all(fns, args.runs)
        fl = {k: flops(fn) for k, fn in fns.items()}
        mem = {k: (None if args.no_memory else peak_memory(name, k)) for k in fns}
        n_params = sum(p.numel() for p in model.parameters())
        t_base, f_base = statistics.median(times["grad"]), fl["grad"]
        print(f"\n{name}: {n_params / 1e6:.2f} M params, grad = {t_base * 1e3:.0f} ms, "
              f"{f_base / 1e9:.2f} GFLOP" + "".join(f"; build {k}: {v:.1f} s" for k, v in BUILD_TIMES.items()))
        print(f"  {'method':<26}{'time ms':>9}{'x grad':>8}{'GFLOP':>9}{'x grad':>8}{'peak MB':>9}")
        rows = {}
        for k in fns:
            t = statistics.median(times[k])
            m = mem[k]
            print(f"  {k:<26}{t * 1e3:>9.0f}{t / t_base:>8.2f}{fl[k] / 1e9:>9.2f}{fl[k] / f_base:>8.2f}"
                  f"{'' if m is None else f'{m:>9.0f}'}")
            rows[k] = {"time_s": t, "all_times_s": times[k], "flops": fl[k], "peak_rss_mb": m}
        results[name] = {"params": n_params, "methods": rows, "build_s": dict(BUILD_TIMES)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
