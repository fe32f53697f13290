"""Pruning quality on the pretrained thin ResNet-56 / CIFAR-10: one-shot, BN-recalibrated, fine-tuned.

For every (criterion, retained-FLOPs target r), starting each time from the dense pretrained model:

1. prune one-shot with ``oba_fx.prune_graph(..., bn_recalibration=False)`` using ``--calib-batches``
   shuffled training batches of ``--calib-batch-size`` (fixed seed, the same batches for every
   criterion) -> accuracy "one-shot";
2. re-estimate the BatchNorm statistics (``oba_fx.bn.recalibrate_bn``) on ``--bn-images`` other
   training images -> accuracy "BN-recal";
3. fine-tune ``--epochs`` epochs (``oba_fx.finetune.finetune``: SGD, ``--lr``, momentum 0.9, weight
   decay 5e-4, constant LR for 1 epoch) on the first ``--train-limit`` training images with
   augmentation, the same data order and augmentation draws for every cell -> accuracy "fine-tuned".

Accuracy is measured on the 1,000 exact test images (``test_lossless1k``, the headline number) and
on the JPEG-degraded test set (``test``, first ``--test-limit`` images). Each row also holds the
achieved FLOPs and parameter fractions and the CPU latency speedup of the slimmed model over the
dense one (median of interleaved timed forward passes of one batch, same process, same threads).

Outputs (default folder ``benchmarks/results``): ``quality.json`` (settings, machine, date, all
rows; rewritten after every cell), ``quality.png`` (accuracy vs retained FLOPs, one panel per
stage), ``quality.md`` (tables and which criterion wins where, computed from the numbers).

Usage::

    python benchmarks/quality.py --data DIR [--ratios 0.7 0.5 0.35]
        [--criteria oba-functional oba-full taylor obd_fisher l1 random] [--calib-batches 10]
        [--bn-images 2000] [--epochs 1] [--lr 0.01] [--train-limit N] [--test-limit N]
        [--dense-finetune] [--threads 2] [--out benchmarks/results] [--note TEXT]
    python benchmarks/quality.py --replot benchmarks/results/quality.json   # redraw md/png only

The JSON, PNG and Markdown are rewritten after every cell, so an interrupted run leaves partial
results (marked "partial"). A failing cell (e.g. a criterion that raises) is recorded with its
error and the stage it failed at, and the run goes on.

The data folder is ``--data`` or ``$OBA_FX_DATA`` (see ``oba_fx.data.data_dir``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("quality")

#: criterion spec -> (prune_graph criterion, hessian mode, label)
CRITERION_SPECS: dict[str, tuple[str, str, str]] = {
    "oba-functional": ("oba", "functional", "OBA (H_F)"),
    "oba-full": ("oba", "full", "OBA (full H)"),
    "taylor": ("taylor", "functional", "Taylor"),
    "obd_fisher": ("obd_fisher", "functional", "OBD (Fisher)"),
    "obd_hutchinson": ("obd_hutchinson", "full", "OBD (Hutchinson)"),
    "l1": ("l1", "functional", "L1"),
    "l2": ("l2", "functional", "L2"),
    "random": ("random", "functional", "random"),
}
DEFAULT_CRITERIA = ["oba-functional", "oba-full", "taylor", "obd_fisher", "l1", "random"]
#: accuracies below this are treated as near chance (10 classes) in the written summary
CHANCE_BAND = 0.2
STAGES = [("one_shot", "one-shot"), ("bn_recal", "BN-recalibrated"), ("finetuned", "fine-tuned")]
WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
           "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}


# ----------------------------------------------------------------------------------------------
# helpers


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": load}


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append((b[0].clone(), b[1].clone()))
    return out


def accuracies(model, loaders: dict[str, Any]) -> dict[str, float]:
    from oba_fx.data import evaluate

    return {name: evaluate(model, ld) for name, ld in loaders.items()}


@torch.no_grad()
def latency(dense, slim, x: torch.Tensor, runs: int, warmup: int = 2) -> dict[str, float]:
    """Median forward time (ms) of ``dense`` and ``slim`` on ``x``, timed interleaved (noisy host)."""
    dense.eval(); slim.eval()
    for _ in range(warmup):
        dense(x); slim(x)
    td, ts = [], []
    for _ in range(runs):
        t = time.perf_counter(); dense(x); td.append(time.perf_counter() - t)
        t = time.perf_counter(); slim(x); ts.append(time.perf_counter() - t)
    md, ms = statistics.median(td), statistics.median(ts)
    return {"dense_ms": 1e3 * md, "slim_ms": 1e3 * ms, "speedup": md / ms, "runs": runs, "batch": int(x.shape[0])}


def finetune_model(model, args, train_loader) -> dict[str, Any]:
    from oba_fx.finetune import finetune

    # same data order and the same augmentation draws for every cell
    train_loader.generator.manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 3)
    t = time.perf_counter()
    res = finetune(model, train_loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, progress=False)
    return {"train_loss": list(res.train_loss), "seconds": time.perf_counter() - t}


# ----------------------------------------------------------------------------------------------
# reporting


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else float("nan")


def _cells(rows):
    return [r for r in rows if r.get("kind") == "pruned"]


def winners(result: dict[str, Any], metric: str, n: int) -> list[dict[str, Any]]:
    """Per (stage, r): best criterion, runner-up, margin and whether it exceeds 2 s.e. of a difference."""
    out = []
    rows = _cells(result["rows"])
    for stage, stage_name in STAGES:
        for r in sorted({row["r_target"] for row in rows}, reverse=True):
            cand = [(row[stage][metric], row["label"]) for row in rows
                    if row["r_target"] == r and row.get(stage) and row[stage].get(metric) is not None]
            if not cand:
                continue
            cand.sort(reverse=True)
            best, label = cand[0]
            second = cand[1] if len(cand) > 1 else (None, None)
            margin = best - second[0] if second[0] is not None else None
            # s.e. of the difference of two accuracies on the same n images (unpaired bound: conservative)
            se = math.sqrt(2) * _se(best, n)
            ties = [lab for acc, lab in cand if best - acc <= 2 * se]
            out.append({"stage": stage, "stage_name": stage_name, "r": r, "winner": label, "acc": best,
                        "runner_up": second[1], "margin": margin, "two_se": 2 * se,
                        "clear": margin is not None and margin > 2 * se, "within_noise_of_best": ties,
                        "ranking": [lab for _, lab in cand]})
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["settings"]
    rows = result["rows"]
    dense = next((r for r in rows if r.get("kind") == "dense"), None)
    dense_ft = next((r for r in rows if r.get("kind") == "dense_finetuned"), None)
    n1k = 1000
    njpeg = s.get("test_images") or 0
    L = []
    L.append("# Pruning quality: thin ResNet-56 on CIFAR-10\n")
    L.append(f"Written by `benchmarks/quality.py` on {result['date']}"
             + (" (**partial: the run had not finished when this was written**)" if not result.get("complete") else "")
             + ". Do not edit by hand; rerun the script.\n")
    L.append("## Settings\n")
    L.append(f"- Command: `{result['command']}`")
    L.append(f"- Model: pretrained `{s['model']}` ({s['weights_file']}), eval-mode scoring, one-shot pruning "
             f"(`steps=1`) to retained-FLOPs targets {', '.join(str(r) for r in s['ratios'])}; "
             "every cell starts from the dense model.")
    L.append(f"- Calibration: {s['calib_batches']} shuffled training batches of {s['calib_batch_size']} "
             f"(seed {s['seed']}, the same for every criterion); `prune_graph(..., bn_recalibration=False)`.")
    L.append(f"- BN recalibration: `recalibrate_bn` on {s['bn_images']} other training images.")
    L.append(f"- Fine-tuning: {s['epochs']} epoch(s) of SGD (lr {s['lr']}, momentum {s['momentum']}, "
             f"weight decay {s['weight_decay']}, batch {s['train_batch_size']}, constant LR) on the first "
             f"{s['train_images']} training images (JPEG-degraded set) with crop+flip augmentation, the same "
             "order and draws for every cell.")
    L.append(f"- Test: exact 1k = `test_lossless1k` (1,000 exact test images, 1 s.d. about 0.8 points); "
             f"JPEG = first {njpeg} images of the JPEG-degraded `test` set (about 10 points below exact).")
    L.append(f"- Latency: median of {s['latency_runs']} interleaved forward passes (dense, slim) of a batch of "
             f"{s['latency_batch']}, {s['threads']} thread(s), same process; the host is shared and noisy.")
    m = result["machine"]
    L.append(f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
             f"{m['torch_threads']} thread(s), load average at start {m.get('loadavg_at_start')}.")
    if s.get("note"):
        L.append(f"- Note: {s['note']}")
    if result.get("wall_s") is not None:
        L.append(f"- Wall time: {result['wall_s'] / 60:.1f} min.")
    L.append("")
    if dense:
        L.append("## Dense reference\n")
        fl = f"{dense['flops'] / 1e6:.1f} MFLOPs (MACs), " if dense.get("flops") else ""
        L.append(f"- Dense: exact 1k {100 * dense['acc']['exact1k']:.1f} %, JPEG {100 * dense['acc']['jpeg']:.2f} %, "
                 f"{fl}{dense['params']:,} parameters.")
        if dense_ft:
            if dense_ft.get("acc"):
                L.append(f"- Dense fine-tuned with the same recipe: exact 1k {100 * dense_ft['acc']['exact1k']:.1f} %, "
                         f"JPEG {100 * dense_ft['acc']['jpeg']:.2f} %.")
            elif dense_ft.get("error"):
                L.append(f"- Dense fine-tuned: failed: {dense_ft['error']}")
        L.append("")
    cells = _cells(rows)
    if cells:
        L.append("## Results (accuracy in %: exact 1k / JPEG)\n")
        L.append("| criterion | r target | FLOPs kept | params kept | one-shot | BN-recal | fine-tuned | "
                 "latency speedup | prune s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

        def acc(row, st):
            a = row.get(st) or {}
            if a.get("exact1k") is None:
                return "—"
            j = a.get("jpeg")
            return f"{100 * a['exact1k']:.1f} / {100 * j:.1f}" if j is not None else f"{100 * a['exact1k']:.1f}"

        for row in sorted(cells, key=lambda r: (-r["r_target"], r["order"])):
            fl = f"{row['flops_frac']:.3f}" if row.get("flops_frac") is not None else "—"
            pa = f"{row['params_frac']:.3f}" if row.get("params_frac") is not None else "—"
            lat = row.get("latency") or {}
            sp = f"{lat['speedup']:.2f}× (FLOPs {1 / row['flops_frac']:.2f}×)" if lat and row.get("flops_frac") else "—"
            ps = f"{row['prune_s']:.0f}" if row.get("prune_s") is not None else "—"
            L.append(f"| {row['label']} | {row['r_target']} | {fl} | {pa} | {acc(row, 'one_shot')} | "
                     f"{acc(row, 'bn_recal')} | {acc(row, 'finetuned')} | {sp} | {ps} |")
        errs = [r for r in cells if r.get("error")]
        if errs:
            L.append("")
            L.append("Failures:")
            for r in errs:
                L.append(f"- {r['label']} at r={r['r_target']} ({r.get('failed_stage')}): `{r['error']}`")
        L.append("")
        L.append("## Who wins where (computed from the numbers above)\n")
        for metric, n, name in (("exact1k", n1k, "exact 1k"), ("jpeg", njpeg, f"JPEG {njpeg}")):
            ws = winners(result, metric, n)
            if not ws:
                continue
            L.append(f"On {name} test images (a lead counts as clear when it exceeds 2 standard errors "
                     f"of a difference, about {100 * ws[0]['two_se']:.1f} points here):\n")
            for w in ws:
                if w["runner_up"] is None:
                    txt = f"{w['winner']} ({100 * w['acc']:.1f} %), the only criterion measured"
                elif w["clear"]:
                    txt = (f"**{w['winner']}** wins clearly ({100 * w['acc']:.1f} %, {100 * w['margin']:.1f} points "
                           f"ahead of {w['runner_up']})")
                else:
                    others = [x for x in w["within_noise_of_best"] if x != w["winner"]]
                    txt = (f"{w['winner']} is highest ({100 * w['acc']:.1f} %) but within noise of "
                           f"{', '.join(others)}")
                if w["acc"] < CHANCE_BAND:
                    txt += f"; every criterion is near chance (10 %) here, so this ranking means little"
                L.append(f"- {w['stage_name']}, r = {w['r']}: {txt}. Order: {' > '.join(w['ranking'])}.")
            L.append("")
        # plain-words summary: wins per criterion per stage on exact 1k, and second order vs L1
        ws = winners(result, "exact1k", n1k)
        L.append("Summary (exact 1k):\n")
        for stage, stage_name in STAGES:
            sw = [w for w in ws if w["stage"] == stage]
            if not sw:
                continue
            counts: dict[str, int] = {}
            for w in sw:
                counts[w["winner"]] = counts.get(w["winner"], 0) + 1
            best = ", ".join(f"{k} {v}/{len(sw)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            L.append(f"- {stage_name}: highest accuracy per target: {best}.")
            # second-order (OBA) vs magnitude
            comp = []
            for r in sorted({c["r_target"] for c in cells}, reverse=True):
                by = {c["label"]: c for c in cells if c["r_target"] == r}
                l1 = (by.get("L1") or {}).get(stage) or {}
                for lab in ("OBA (H_F)", "OBA (full H)"):
                    o = (by.get(lab) or {}).get(stage) or {}
                    if o.get("exact1k") is not None and l1.get("exact1k") is not None:
                        comp.append((r, lab, 100 * (o["exact1k"] - l1["exact1k"]),
                                     max(o["exact1k"], l1["exact1k"]) < CHANCE_BAND))
            if comp:
                two_se = 100 * math.sqrt(2) * 2 * _se(0.5, n1k)
                parts = [f"{lab} at r={r}: {d:+.1f}" + (" (both near chance)" if ch else "")
                         for r, lab, d, ch in comp]
                real = [(d, ch) for _, _, d, ch in comp if not ch]
                ahead = sum(d > two_se for d, _ in real)
                behind = sum(d < -two_se for d, _ in real)
                L.append(f"  - OBA minus L1 (points): {'; '.join(parts)}. Excluding near-chance pairs, OBA is "
                         f"clearly ahead (> {two_se:.1f} points) in {ahead}, clearly behind in {behind}, and within "
                         f"noise in {len(real) - ahead - behind} of {len(real)} comparisons.")
        L.append("")
        L.append("![accuracy vs retained FLOPs](quality.png)\n")
    path.write_text("\n".join(L) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cells = _cells(rows)
    dense = next((r for r in rows if r.get("kind") == "dense"), None)
    dense_ft = next((r for r in rows if r.get("kind") == "dense_finetuned" and r.get("acc")), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    labels = []
    for row in sorted(cells, key=lambda r: r["order"]):
        if row["label"] not in labels:
            labels.append(row["label"])
    markers = "osD^vP*X"
    for ax, (stage, stage_name) in zip(axes, STAGES):
        for i, lab in enumerate(labels):
            pts = sorted((row["flops_frac"], row[stage]["exact1k"]) for row in cells
                         if row["label"] == lab and row.get(stage) and row[stage].get("exact1k") is not None
                         and row.get("flops_frac") is not None)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [100 * p[1] for p in pts]
            es = [100 * _se(p[1], 1000) for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], capsize=2, label=lab)
        if dense:
            ax.axhline(100 * dense["acc"]["exact1k"], color="k", ls="--", lw=1, label="dense")
        if dense_ft and stage == "finetuned":
            ax.axhline(100 * dense_ft["acc"]["exact1k"], color="gray", ls=":", lw=1.2, label="dense + same fine-tuning")
        xs_all = [row["flops_frac"] for row in cells if row.get("flops_frac") is not None]
        if xs_all:
            ax.set_xlim(min(xs_all) - 0.05, 1.03)
        ax.set_title(stage_name)
        ax.set_xlabel("retained FLOPs (fraction)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy on exact 1k test images (%)")
    handles, labs = [], []
    for ax in axes:
        h, l_ = ax.get_legend_handles_labels()
        for hh, ll in zip(h, l_):
            if ll not in labs:
                handles.append(hh); labs.append(ll)
    axes[-1].legend(handles, labs, fontsize=8, loc="lower right")
    s = result["settings"]
    fig.suptitle(f"ResNet-56 / CIFAR-10 one-shot pruning: {s['calib_batches']}×{s['calib_batch_size']} calib, "
                 f"BN on {s['bn_images']} imgs, {s['epochs']} ep fine-tuning on {s['train_images']} imgs "
                 f"(error bars: ±1 s.e., n=1000)" + ("" if result.get("complete") else " [partial]"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / "quality.json")
    for fn, name in ((write_markdown, "quality.md"), (write_plot, "quality.png")):
        try:
            fn(result, out / name)
        except Exception:  # a report must not kill the run
            log.error("could not write %s:\n%s", name, traceback.format_exc())


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default: $OBA_FX_DATA)")
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--weights", default=None, help="checkpoint (default: <data>/weights/<upstream name>)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5, 0.35], help="retained-FLOPs targets")
    p.add_argument("--criteria", nargs="+", default=DEFAULT_CRITERIA, choices=sorted(CRITERION_SPECS))
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--bn-images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (0: skip the stage)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="fine-tune on the first N training images (all 50k)")
    p.add_argument("--test-limit", type=int, default=None, help="first N images of the JPEG test set (all 10k)")
    p.add_argument("--dense-finetune", action="store_true", help="also fine-tune the dense model as a reference")
    p.add_argument("--latency-runs", type=int, default=9)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--note", default="", help="free text stored with the settings (e.g. why settings were reduced)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only rewrite quality.md and quality.png in --out from an existing quality.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("oba_fx", "passes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        out = Path(args.out)
        write_markdown(result, out / "quality.md")
        write_plot(result, out / "quality.png")
        log.info("rewrote %s and %s from %s", out / "quality.md", out / "quality.png", args.replot)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from oba_fx import prune_graph
    from oba_fx.bn import recalibrate_bn
    from oba_fx.data import cifar10_loader, data_dir
    from oba_fx.models import get_model

    ddir = data_dir(args.data)
    weights = Path(args.weights) if args.weights else ddir / "weights" / WEIGHTS[args.model]
    out = Path(args.out)

    log.info("loading data from %s", ddir)
    torch.manual_seed(args.seed)
    cal_loader = cifar10_loader(ddir, "train", args.calib_batch_size, shuffle=True, seed=args.seed)
    n_bn_batches = math.ceil(args.bn_images / args.calib_batch_size)
    drawn = take(cal_loader, args.calib_batches + n_bn_batches)  # one permutation: calib, then BN images
    calib = drawn[:args.calib_batches]
    bn_batches = drawn[args.calib_batches:]
    extra = n_bn_batches * args.calib_batch_size - args.bn_images
    if extra > 0 and bn_batches:
        x, y = bn_batches[-1]
        bn_batches[-1] = (x[: len(x) - extra], y[: len(y) - extra])
    del cal_loader
    train_loader = cifar10_loader(ddir, "train", args.train_batch_size, limit=args.train_limit, shuffle=True,
                                  augment=True, seed=args.seed + 2) if args.epochs > 0 else None
    test_loaders = {
        "exact1k": cifar10_loader(ddir, "test_lossless1k", args.eval_batch_size),
        "jpeg": cifar10_loader(ddir, "test", args.eval_batch_size, limit=args.test_limit),
    }
    n_train = len(train_loader.dataset) if train_loader is not None else 0
    n_test = len(test_loaders["jpeg"].dataset)
    ex = calib[0][0][:1].clone()
    lat_x = torch.randn(args.latency_batch, *calib[0][0].shape[1:], generator=torch.Generator().manual_seed(0))

    dense = get_model(args.model, weights=str(weights)).eval()
    result: dict[str, Any] = {
        "benchmark": "quality",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("data",)},
                     "weights_file": weights.name, "train_images": n_train, "test_images": n_test,
                     "bn_images_used": sum(len(b[0]) for b in bn_batches), "stages": [s for s, _ in STAGES],
                     "finetune_schedule": "constant LR (oba_fx.finetune milestones default: none for 1 epoch)",
                     "flops_unit": "multiply-accumulates counted by oba_fx"},
        "rows": [],
        "complete": False,
    }
    log.info("settings: %s", json.dumps(result["settings"], default=str))

    t = time.perf_counter()
    d_acc = accuracies(dense, test_loaders)
    dense_row = {"kind": "dense", "label": "dense", "acc": d_acc, "eval_s": time.perf_counter() - t,
                 "params": sum(p.numel() for p in dense.parameters())}
    # FLOPs of the dense model: from a data-free prune of nothing is not available; take it from the first cell
    result["rows"].append(dense_row)
    log.info("dense: exact1k %.4f, jpeg %.4f (%.0f s)", d_acc["exact1k"], d_acc["jpeg"], dense_row["eval_s"])
    save(result, out)

    if args.dense_finetune and args.epochs > 0:
        row: dict[str, Any] = {"kind": "dense_finetuned", "label": "dense + fine-tuning"}
        try:
            m = copy.deepcopy(dense)
            row["finetune"] = finetune_model(m, args, train_loader)
            row["acc"] = accuracies(m, test_loaders)
            log.info("dense fine-tuned: %s (%.0f s)", row["acc"], row["finetune"]["seconds"])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            log.error("dense fine-tuning failed:\n%s", traceback.format_exc())
        result["rows"].append(row)
        save(result, out)

    order = 0
    for r in args.ratios:
        for spec in args.criteria:
            crit, hess, label = CRITERION_SPECS[spec]
            row = {"kind": "pruned", "spec": spec, "criterion": crit, "hessian": hess if crit == "oba" else None,
                   "label": label, "r_target": r, "order": args.criteria.index(spec), "error": None}
            order += 1
            log.info("=== cell %d/%d: %s, r=%s", order, len(args.ratios) * len(args.criteria), label, r)
            stage = "prune"
            t_cell = time.perf_counter()
            try:
                t = time.perf_counter()
                slim = prune_graph(dense, ex, criterion=crit, target_flops=r, data=calib,
                                   max_batches=args.calib_batches, hessian=hess, steps=1,
                                   bn_recalibration=False, seed=args.seed, verbose=False)
                row["prune_s"] = time.perf_counter() - t
                meta = slim.meta["oba"]
                row.update(flops_before=meta["flops_before"], flops_after=meta["flops_after"],
                           params_before=meta["params_before"], params_after=meta["params_after"],
                           flops_frac=meta["flops_after"] / meta["flops_before"],
                           params_frac=meta["params_after"] / meta["params_before"],
                           units_removed=meta.get("units_removed"), units_prunable=meta.get("units_prunable"),
                           max_rel_error=meta.get("max_rel_error"))
                if "flops" not in dense_row:
                    dense_row["flops"] = meta["flops_before"]
                log.info("pruned in %.0f s: FLOPs %.3f, params %.3f", row["prune_s"], row["flops_frac"],
                         row["params_frac"])
                stage = "latency"
                row["latency"] = latency(dense, slim, lat_x, args.latency_runs)
                log.info("latency: dense %.1f ms, slim %.1f ms, speedup %.2fx (FLOPs ratio %.2fx)",
                         row["latency"]["dense_ms"], row["latency"]["slim_ms"], row["latency"]["speedup"],
                         1 / row["flops_frac"])
                stage = "one_shot"
                row["one_shot"] = accuracies(slim, test_loaders)
                log.info("one-shot: %s", row["one_shot"])
                stage = "bn_recal"
                recalibrate_bn(slim, bn_batches)
                row["bn_recal"] = accuracies(slim, test_loaders)
                log.info("BN-recal: %s", row["bn_recal"])
                if args.epochs > 0:
                    stage = "finetune"
                    row["finetune"] = finetune_model(slim, args, train_loader)
                    row["finetuned"] = accuracies(slim, test_loaders)
                    log.info("fine-tuned (%.0f s): %s", row["finetune"]["seconds"], row["finetuned"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                row["failed_stage"] = stage
                log.error("%s r=%s failed at %s:\n%s", label, r, stage, traceback.format_exc())
            row["cell_s"] = time.perf_counter() - t_cell
            result["rows"].append(row)
            result["elapsed_s"] = time.perf_counter() - t_start
            save(result, out)
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - t_start
    save(result, out)
    log.info("done in %.1f min; wrote %s", result["wall_s"] / 60, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
