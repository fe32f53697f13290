"""Pruning quality on CIFAR-10 (pretrained thin ResNet-56, or the small ViT): one-shot, BN-recalibrated, fine-tuned.

For every (criterion, retained-FLOPs target r), starting each time from the dense pretrained model:

1. prune one-shot with ``oba_fx.prune_graph(..., bn_recalibration=False, compensate=False,
   keep_residual=False)`` (the protocol of the first measurements; ``benchmarks/ranking.py`` measures
   the current defaults, compensation and kept residual streams; ``--compensation on`` or ``both``
   adds the least-squares re-fit here, ``both`` running every criterion without and with it, the
   rows labelled "+ LS re-fit") using ``--calib-batches``
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

Outputs (default folder ``benchmarks/results``): ``<name>.json`` (settings, machine, date, all
rows; rewritten after every cell), ``<name>.png`` (accuracy vs retained FLOPs, one panel per
stage), ``<name>.md`` (tables and which criterion wins where, computed from the numbers). ``--name``
defaults to ``quality`` for the ResNets and ``quality_vit`` for the ViT, so the two never overwrite
each other.

The ViT (``--model vit_cifar --weights CKPT``, a checkpoint of ``benchmarks/train_vit_cifar.py``,
default ``benchmarks/results/vit_cifar.pt``; rebuilt with ``oba_fx.models.load_vit_cifar``):

* default criteria ``oba-functional l1 taylor``;
* no BatchNorm, so stage 2 would equal stage 1: it is skipped (the tables and the plot have no
  BN-recal column/panel and the JSON says ``"bn_recal_skipped"``);
* fine-tuning (``--optimizer``, default ``adamw`` for the ViT, ``sgd`` for the ResNets): AdamW,
  ``--lr`` 1e-4, ``--weight-decay`` 0.05 (not on biases, norms and embeddings), label smoothing
  0.1 as in training, cosine decay of the learning rate to 0 over the fine-tuning steps, batch
  ``--train-batch-size``;
* each row also holds the MLP neurons kept per block and, when the pruning report has a
  ``"heads"`` entry (``{attention module: [heads before, heads after]}``), the attention heads kept
  per block; the Markdown lists both.

Usage::

    python benchmarks/quality.py --data DIR [--ratios 0.7 0.5 0.35]
        [--criteria oba-functional oba-full taylor obd_fisher l1 random] [--calib-batches 10]
        [--bn-images 2000] [--epochs 1] [--lr 0.01] [--train-limit N] [--test-limit N]
        [--dense-finetune] [--threads 2] [--out benchmarks/results] [--note TEXT]
    python benchmarks/quality.py --model vit_cifar --weights benchmarks/results/vit_cifar.pt --data DIR
        [--ratios 0.7 0.5] [--criteria oba-functional l1 taylor] ...   # writes quality_vit.*
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
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402  (benchmarks/ is not a package)

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
#: label suffix of the rows pruned with compensation
REFIT = " + LS re-fit"
#: --compensation -> the compensate= values each criterion is run with (False first)
COMPENSATION_MODES = {"off": (False,), "on": (True,), "both": (False, True)}
DEFAULT_CRITERIA = ["oba-functional", "oba-full", "taylor", "obd_fisher", "l1", "random"]
VIT_DEFAULT_CRITERIA = ["oba-functional", "l1", "taylor"]
#: accuracies below this are treated as near chance (10 classes) in the written summary
CHANCE_BAND = 0.2
STAGES = [("one_shot", "one-shot"), ("bn_recal", "BN-recalibrated"), ("finetuned", "fine-tuned")]
WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
           "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
VIT_MODEL = "vit_cifar"
VIT_DEFAULT_WEIGHTS = "benchmarks/results/vit_cifar.pt"
#: model -> (long name for titles, short name for the plot)
MODEL_NAMES = {**{m: (f"thin ResNet-{m[6:]}", f"ResNet-{m[6:]}") for m in WEIGHTS},
               VIT_MODEL: ("small ViT (`vit_cifar`)", "ViT (vit_cifar)")}
#: per model family: optimizer, lr, weight decay, label smoothing of the fine-tuning stage
FINETUNE_DEFAULTS = {"sgd": {"lr": 0.01, "weight_decay": 5e-4, "label_smoothing": 0.0},
                     "adamw": {"lr": 1e-4, "weight_decay": 0.05, "label_smoothing": 0.1}}


# ----------------------------------------------------------------------------------------------
# helpers


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        out.append((b[0].clone(), b[1].clone()))
    return out


def accuracies(model, loaders: dict[str, Any]) -> dict[str, float]:
    from oba_fx.evaluate import evaluate

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


def vit_structure(dense, meta: dict[str, Any]) -> dict[str, Any]:
    """MLP neurons and ``qkv`` output features kept per block of a ViTCifar, from the report's ``kept``."""
    kept = meta.get("kept") or {}
    mlp, qkv = [], []
    for i, blk in enumerate(dense.blocks):
        fc1 = kept.get(f"blocks.{i}.mlp.fc1.weight") or {}
        mlp.append(len(fc1[0]) if 0 in fc1 else blk.mlp.fc1.out_features)
        w = kept.get(f"blocks.{i}.attn.qkv.weight") or {}
        qkv.append(len(w[0]) if 0 in w else blk.attn.qkv.out_features)
    return {"mlp_kept": mlp, "mlp_full": dense.blocks[0].mlp.fc1.out_features,
            "qkv_kept": qkv, "qkv_full": dense.blocks[0].attn.qkv.out_features}


def stages_of(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The stages this run measured (no BN-recal stage for models without BatchNorm)."""
    have = result.get("settings", {}).get("stages")
    return [st for st in STAGES if have is None or st[0] in have]


def _adamw_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and kernels only, not biases, norm scales, class token or position embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def finetune_adamw(model, train_loader, epochs: int, lr: float, weight_decay: float,
                   loss_fn: torch.nn.Module, distill: dict[str, Any]) -> list[float]:
    """AdamW with a per-step cosine decay to 0 (no warm-up); returns the mean loss of each epoch."""
    from oba_fx.finetune import train_epoch

    opt = torch.optim.AdamW(_adamw_groups(model, weight_decay), lr=lr)
    total = max(1, epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(1.0, k / total))))
    losses = [train_epoch(model, train_loader, opt, loss_fn=loss_fn, scheduler=sched, progress=False,
                          desc=f"fine-tuning epoch {e + 1}/{epochs}", **distill)["loss"] for e in range(epochs)]
    model.eval()
    return losses


def finetune_model(model, args, train_loader, teacher=None) -> dict[str, Any]:
    """Fine-tune ``model`` with ``args.optimizer``; with ``--distill``, from ``teacher`` (the dense model)."""
    from oba_fx.finetune import finetune

    # same data order and the same augmentation draws for every cell
    train_loader.generator.manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 3)
    t = time.perf_counter()
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing) if args.label_smoothing else None
    distill = ({"teacher": teacher, "temperature": args.distill_temperature, "distill_weight": args.distill_weight}
               if args.distill and teacher is not None else {})
    if args.optimizer == "adamw":
        losses = finetune_adamw(model, train_loader, args.epochs, args.lr, args.weight_decay,
                                loss_fn or torch.nn.CrossEntropyLoss(), distill)
    else:
        res = finetune(model, train_loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, progress=False, loss_fn=loss_fn, **distill)
        losses = list(res.train_loss)
    return {"train_loss": losses, "seconds": time.perf_counter() - t}


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
    for stage, stage_name in stages_of(result):
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
    long_name, _ = MODEL_NAMES.get(s["model"], (s["model"], s["model"]))
    stages = stages_of(result)
    has_bn = any(st == "bn_recal" for st, _ in stages)
    vit = s["model"] == VIT_MODEL
    img = s.get("name", "quality") + ".png"
    L.append(f"# Pruning quality: {long_name} on CIFAR-10\n")
    L.append(f"Written by `benchmarks/quality.py` on {result['date']}"
             + (" (**partial: the run had not finished when this was written**)" if not result.get("complete") else "")
             + ". Do not edit by hand; rerun the script.\n")
    L.append("## Settings\n")
    L.append(f"- Command: `{result['command']}`")
    if vit:
        tr = s.get("trained") or {}
        how = (f"trained from scratch by `benchmarks/train_vit_cifar.py` ({tr.get('epochs')} epochs; "
               f"config {tr.get('config')})")
        L.append(f"- Model: `{s['model']}` ({s['weights_file']}), {how}, eval-mode scoring, one-shot pruning "
                 f"(`steps=1`) to retained-FLOPs targets {', '.join(str(r) for r in s['ratios'])}; "
                 "every cell starts from the dense model.")
    else:
        L.append(f"- Model: pretrained `{s['model']}` ({s['weights_file']}), eval-mode scoring, one-shot pruning "
                 f"(`steps=1`) to retained-FLOPs targets {', '.join(str(r) for r in s['ratios'])}; "
                 "every cell starts from the dense model.")
    L.append(f"- Calibration: {s['calib_batches']} shuffled training batches of {s['calib_batch_size']} "
             f"(seed {s['seed']}, the same for every criterion); `prune_graph(..., bn_recalibration=False)`.")
    if has_bn:
        L.append(f"- BN recalibration: `recalibrate_bn` on {s['bn_images']} other training images.")
    else:
        L.append("- BN recalibration: skipped, the model has no BatchNorm (the stage would equal one-shot).")
    if s.get("optimizer", "sgd") == "adamw":
        L.append(f"- Fine-tuning: {s['epochs']} epoch(s) of AdamW (lr {s['lr']}, weight decay {s['weight_decay']} "
                 f"on matrices only, label smoothing {s.get('label_smoothing')}, batch {s['train_batch_size']}, "
                 f"cosine decay to 0 over the steps) on the first {s['train_images']} training images "
                 "(JPEG-degraded set) with crop+flip augmentation, the same order and draws for every cell.")
    else:
        ls = f", label smoothing {s['label_smoothing']}" if s.get("label_smoothing") else ""
        L.append(f"- Fine-tuning: {s['epochs']} epoch(s) of SGD (lr {s['lr']}, momentum {s['momentum']}, "
                 f"weight decay {s['weight_decay']}{ls}, batch {s['train_batch_size']}, constant LR) on the first "
                 f"{s['train_images']} training images (JPEG-degraded set) with crop+flip augmentation, the same "
                 "order and draws for every cell.")
    if s.get("distill"):
        L.append(f"- Distillation during fine-tuning: teacher = the dense model, temperature "
                 f"{s.get('distill_temperature')}, weight {s.get('distill_weight')} "
                 "(`oba_fx.finetune.distillation_loss`).")
    L.append(f"- Test: exact 1k = `test_lossless1k` (1,000 exact test images, 1 s.d. about 0.8 points); "
             f"JPEG = first {njpeg} images of the JPEG-degraded `test` set "
             + ("(the ViT was trained on JPEG-degraded images and scores about as well on them as on exact ones)."
                if vit else "(about 10 points below exact)."))
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
        short = {"one_shot": "one-shot", "bn_recal": "BN-recal", "finetuned": "fine-tuned"}
        L.append("| criterion | r target | FLOPs kept | params kept | "
                 + " | ".join(short[st] for st, _ in stages) + " | latency speedup | prune s |")
        L.append("|---|---:|---:|---:|" + "---:|" * len(stages) + "---:|---:|")

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
            L.append(f"| {row['label']} | {row['r_target']} | {fl} | {pa} | "
                     + " | ".join(acc(row, st) for st, _ in stages) + f" | {sp} | {ps} |")
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
                    txt += "; every criterion is near chance (10 %) here, so this ranking means little"
                L.append(f"- {w['stage_name']}, r = {w['r']}: {txt}. Order: {' > '.join(w['ranking'])}.")
            L.append("")
        # plain-words summary: wins per criterion per stage on exact 1k, and second order vs L1
        ws = winners(result, "exact1k", n1k)
        L.append("Summary (exact 1k):\n")
        for stage, stage_name in stages:
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
                for refit in ("", REFIT):
                    l1 = (by.get("L1" + refit) or {}).get(stage) or {}
                    for lab in ("OBA (H_F)" + refit, "OBA (full H)" + refit):
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
            gains = [(r, c["label"], 100 * (c[stage]["exact1k"] - base[stage]["exact1k"]))
                     for r in sorted({c["r_target"] for c in cells}, reverse=True)
                     for c in cells if c["r_target"] == r and c["label"].endswith(REFIT) and c.get(stage)
                     for base in cells if base["r_target"] == r and base["label"] == c["label"][:-len(REFIT)]
                     and base.get(stage)]
            if gains:
                L.append("  - re-fit minus no re-fit, same criterion (points): "
                         + "; ".join(f"{lab[:-len(REFIT)]} at r={r}: {d:+.1f}" for r, lab, d in gains) + ".")
        L.append("")
        if vit:
            L.extend(structure_markdown(cells))
        L.append(f"![accuracy vs retained FLOPs]({img})\n")
    path.write_text("\n".join(L) + "\n")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def structure_markdown(cells: list[dict[str, Any]]) -> list[str]:
    """ViT: attention heads and MLP neurons kept per block, per cell (from the pruning report)."""
    L = ["## What was removed, per block\n"]
    done = [c for c in cells if c.get("mlp_kept") is not None]
    if not done:
        return []
    with_heads = [c for c in done if c.get("heads")]
    if with_heads:
        L.append("Attention heads per block, kept / before (from `out.meta['oba']['heads']`), and the "
                 "total removed:\n")
        names = sorted({n for c in with_heads for n in c["heads"]}, key=_natural)
        L.append("| criterion | r target | " + " | ".join(f"`{n}`" for n in names) + " | heads removed |")
        L.append("|---|---:|" + "---:|" * len(names) + "---:|")
        for c in sorted(with_heads, key=lambda r: (-r["r_target"], r["order"])):
            h = c["heads"]
            cols = [f"{h[n][1]}/{h[n][0]}" if n in h else "—" for n in names]
            removed = sum(b - a for b, a in h.values())
            L.append(f"| {c['label']} | {c['r_target']} | " + " | ".join(cols) + f" | {removed} |")
        L.append("")
    else:
        bar = sorted({b for c in done for b in c.get("barriers") or []})
        L.append("No attention heads were removed: the pruning reports have no `heads` entry"
                 + (f" (barriers reported: {', '.join(f'`{b}`' for b in bar)})" if bar else "")
                 + ". Only MLP neurons were pruned.\n")
    qkv = [c for c in done if c.get("qkv_full") and any(k < c["qkv_full"] for k in c.get("qkv_kept") or [])]
    if qkv and not with_heads:
        L.append("(Yet some `qkv` output features were removed: "
                 + "; ".join(f"{c['label']} r={c['r_target']}: {c['qkv_kept']}" for c in qkv) + ".)\n")
    depth = max(len(c["mlp_kept"]) for c in done)
    full = done[0].get("mlp_full")
    L.append(f"MLP hidden neurons kept per block (of {full}):\n")
    L.append("| criterion | r target | " + " | ".join(f"block {i}" for i in range(depth)) + " | total kept |")
    L.append("|---|---:|" + "---:|" * depth + "---:|")
    for c in sorted(done, key=lambda r: (-r["r_target"], r["order"])):
        L.append(f"| {c['label']} | {c['r_target']} | " + " | ".join(str(k) for k in c["mlp_kept"])
                 + f" | {sum(c['mlp_kept'])} |")
    L.append("")
    return L


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cells = _cells(rows)
    dense = next((r for r in rows if r.get("kind") == "dense"), None)
    dense_ft = next((r for r in rows if r.get("kind") == "dense_finetuned" and r.get("acc")), None)
    stages = stages_of(result)
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4.6), sharey=True)
    labels = []
    for row in sorted(cells, key=lambda r: r["order"]):
        if row["label"] not in labels:
            labels.append(row["label"])
    markers = "osD^vP*X"
    for ax, (stage, stage_name) in zip(axes, stages):
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
    _, short_name = MODEL_NAMES.get(s["model"], (s["model"], s["model"]))
    bn = f"BN on {s['bn_images']} imgs, " if any(st == "bn_recal" for st, _ in stages) else "no BN, "
    fig.suptitle(f"{short_name} / CIFAR-10 one-shot pruning: {s['calib_batches']}×{s['calib_batch_size']} calib, "
                 f"{bn}{s['epochs']} ep fine-tuning on {s['train_images']} imgs "
                 f"(error bars: ±1 s.e., n=1000)" + ("" if result.get("complete") else " [partial]"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(result: dict[str, Any], out: Path, name: str = "quality") -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out / f"{name}.json")
    for fn, name in ((write_markdown, f"{name}.md"), (write_plot, f"{name}.png")):
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
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS) + [VIT_MODEL])
    p.add_argument("--weights", default=None, help="checkpoint (default: <data>/weights/<upstream name>; "
                   f"for {VIT_MODEL}: {VIT_DEFAULT_WEIGHTS})")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5, 0.35], help="retained-FLOPs targets")
    p.add_argument("--criteria", nargs="+", default=None, choices=sorted(CRITERION_SPECS),
                   help=f"default: {' '.join(DEFAULT_CRITERIA)}; for {VIT_MODEL}: {' '.join(VIT_DEFAULT_CRITERIA)}")
    p.add_argument("--compensation", default="off", choices=sorted(COMPENSATION_MODES),
                   help="least-squares re-fit of the layers that read removed units (prune_graph's compensate=): "
                        "off (this benchmark's first protocol), on, or both (each criterion twice, side by side)")
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--bn-images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (0: skip the stage)")
    p.add_argument("--optimizer", default=None, choices=sorted(FINETUNE_DEFAULTS),
                   help=f"fine-tuning optimizer (default: sgd; for {VIT_MODEL}: adamw)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.01 with sgd, 1e-4 with adamw")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 5e-4 with sgd, 0.05 with adamw")
    p.add_argument("--label-smoothing", type=float, default=None, help="default: 0 with sgd, 0.1 with adamw")
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="fine-tune on the first N training images (all 50k)")
    p.add_argument("--test-limit", type=int, default=None, help="first N images of the JPEG test set (all 10k)")
    p.add_argument("--dense-finetune", action="store_true", help="also fine-tune the dense model as a reference")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune with distillation from the dense model (oba_fx.finetune.distillation_loss)")
    p.add_argument("--distill-temperature", type=float, default=4.0)
    p.add_argument("--distill-weight", type=float, default=0.9, help="share of the distillation term")
    p.add_argument("--latency-runs", type=int, default=9)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--name", default=None,
                   help=f"base name of the output files (default: quality; for {VIT_MODEL}: quality_vit)")
    p.add_argument("--note", default="", help="free text stored with the settings (e.g. why settings were reduced)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only rewrite <name>.md and <name>.png in --out from an existing JSON "
                        "(name: --name, else the JSON's)")
    args = p.parse_args(argv)
    vit = args.model == VIT_MODEL
    if args.criteria is None:
        args.criteria = list(VIT_DEFAULT_CRITERIA if vit else DEFAULT_CRITERIA)
    if args.optimizer is None:
        args.optimizer = "adamw" if vit else "sgd"
    for key, value in FINETUNE_DEFAULTS[args.optimizer].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.name is None and not args.replot:
        args.name = "quality_vit" if vit else "quality"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("oba_fx", "passes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        out = Path(args.out)
        name = args.name or result["settings"].get("name") or Path(args.replot).stem
        result["settings"]["name"] = name
        out.mkdir(parents=True, exist_ok=True)
        write_markdown(result, out / f"{name}.md")
        write_plot(result, out / f"{name}.png")
        log.info("rewrote %s and %s from %s", out / f"{name}.md", out / f"{name}.png", args.replot)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from oba_fx import prune_graph
    from oba_fx.bn import recalibrate_bn
    from oba_fx.data import cifar10_loader, data_dir
    from oba_fx.models import get_model, load_vit_cifar

    ddir = data_dir(args.data)
    vit = args.model == VIT_MODEL
    if vit:
        weights = Path(args.weights or VIT_DEFAULT_WEIGHTS)
    else:
        weights = Path(args.weights) if args.weights else ddir / "weights" / WEIGHTS[args.model]
    out = Path(args.out)
    name = args.name

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
    # The ViT is traced with a batch of 2, so that a size taken from the batch dimension (its
    # `cls_token.expand(B, -1, -1)`) is never confused with a broadcast size-1 dimension (slimming
    # once rewrote it to -1 for a batch-1 example, fixed in 4eff808). FLOPs are reported per image.
    ex_batch = 2 if vit else 1
    ex = calib[0][0][:ex_batch].clone()
    lat_x = torch.randn(args.latency_batch, *calib[0][0].shape[1:], generator=torch.Generator().manual_seed(0))

    trained: dict[str, Any] | None = None
    if vit:
        dense = load_vit_cifar(weights).eval()
        ck = torch.load(weights, map_location="cpu", weights_only=True)
        trained = {"epochs": ck.get("epochs"), "config": ck.get("config"), "test_acc": ck.get("test_acc")}
        del ck
    else:
        dense = get_model(args.model, weights=str(weights)).eval()
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in dense.modules())
    stages = [st for st in STAGES if has_bn or st[0] != "bn_recal"]
    result: dict[str, Any] = {
        "benchmark": "quality",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("data",)},
                     "weights_file": weights.name, "train_images": n_train, "test_images": n_test,
                     "bn_images_used": sum(len(b[0]) for b in bn_batches) if has_bn else 0,
                     "example_batch": ex_batch,
                     "stages": [s for s, _ in stages], "has_bn": has_bn, "trained": trained,
                     "bn_recal_skipped": None if has_bn else "the model has no BatchNorm: the stage would equal one-shot",
                     "finetune_schedule": ("AdamW, per-step cosine decay to 0, no warm-up" if args.optimizer == "adamw"
                                           else "constant LR (oba_fx.finetune milestones default: none for 1 epoch)"),
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
    save(result, out, name)

    if args.dense_finetune and args.epochs > 0:
        row: dict[str, Any] = {"kind": "dense_finetuned", "label": "dense + fine-tuning"}
        try:
            m = copy.deepcopy(dense)
            row["finetune"] = finetune_model(m, args, train_loader, teacher=dense)
            row["acc"] = accuracies(m, test_loaders)
            log.info("dense fine-tuned: %s (%.0f s)", row["acc"], row["finetune"]["seconds"])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            log.error("dense fine-tuning failed:\n%s", traceback.format_exc())
        result["rows"].append(row)
        save(result, out, name)

    order = 0
    variants = [(spec, comp) for spec in args.criteria for comp in COMPENSATION_MODES[args.compensation]]
    for r in args.ratios:
        for spec, comp in variants:
            crit, hess, label = CRITERION_SPECS[spec]
            if comp:
                label += REFIT
            row = {"kind": "pruned", "spec": spec + ("+ls" if comp else ""), "criterion": crit,
                   "hessian": hess if crit == "oba" else None, "compensate": comp,
                   "label": label, "r_target": r, "order": variants.index((spec, comp)), "error": None}
            order += 1
            log.info("=== cell %d/%d: %s, r=%s", order, len(args.ratios) * len(variants), label, r)
            stage = "prune"
            t_cell = time.perf_counter()
            try:
                t = time.perf_counter()
                slim = prune_graph(dense, ex, criterion=crit, target_flops=r, data=calib,
                                   max_batches=args.calib_batches, hessian=hess, steps=1,
                                   bn_recalibration=False, seed=args.seed, verbose=False,
                                   compensate=comp, keep_residual=False,  # this benchmark's protocol
                                   ranking="group_max")  # as first measured (oba's default is per_flop now)
                row["prune_s"] = time.perf_counter() - t
                meta = slim.meta["oba"]
                row.update(flops_before=meta["flops_before"], flops_after=meta["flops_after"],
                           params_before=meta["params_before"], params_after=meta["params_after"],
                           flops_frac=meta["flops_after"] / meta["flops_before"],
                           params_frac=meta["params_after"] / meta["params_before"],
                           units_removed=meta.get("units_removed"), units_prunable=meta.get("units_prunable"),
                           max_rel_error=meta.get("max_rel_error"))
                if "flops" not in dense_row:
                    dense_row["flops"] = meta["flops_before"] / ex_batch  # per image
                row["barriers"] = sorted({b.get("node", "?") for b in meta.get("barriers") or []})
                if meta.get("heads") is not None:
                    row["heads"] = {str(k): [int(v[0]), int(v[1])] for k, v in meta["heads"].items()}
                    log.info("heads (before, after): %s", row["heads"])
                if vit:
                    row.update(vit_structure(dense, meta))
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
                if has_bn:
                    stage = "bn_recal"
                    recalibrate_bn(slim, bn_batches)
                    row["bn_recal"] = accuracies(slim, test_loaders)
                    log.info("BN-recal: %s", row["bn_recal"])
                if args.epochs > 0:
                    stage = "finetune"
                    row["finetune"] = finetune_model(slim, args, train_loader, teacher=dense)
                    row["finetuned"] = accuracies(slim, test_loaders)
                    log.info("fine-tuned (%.0f s): %s", row["finetune"]["seconds"], row["finetuned"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                row["failed_stage"] = stage
                log.error("%s r=%s failed at %s:\n%s", label, r, stage, traceback.format_exc())
            row["cell_s"] = time.perf_counter() - t_cell
            result["rows"].append(row)
            result["elapsed_s"] = time.perf_counter() - t_start
            save(result, out, name)
    result["complete"] = True
    result["wall_s"] = time.perf_counter() - t_start
    save(result, out, name)
    log.info("done in %.1f min; wrote %s", result["wall_s"] / 60, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
