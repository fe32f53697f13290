"""Train the small CIFAR ViT (``oba_fx.models.vit_cifar``) from scratch on the CIFAR-10 npz files.

This produces the dense model that ``benchmarks/quality.py --model vit_cifar`` prunes. It is a
benchmark helper, not a test.

Recipe: AdamW (``--lr`` 1e-3, ``--weight-decay`` 0.05, no decay on biases, norms, the class token
and the position embedding), batches of ``--batch-size`` 128, a per-step learning-rate schedule of
``--warmup-epochs`` 1 linear warm-up epoch followed by a cosine decay to 0 at the end of
``--epochs``, cross-entropy with label smoothing 0.1, random crop (4-pixel padding) and horizontal
flip (``oba_fx.data.cifar10_loader(..., augment=True)``), on the (JPEG-degraded) training set or
its first ``--train-limit`` images.

After every epoch the script logs the mean training loss and the top-1 accuracy on the 1,000
exact test images (``test_lossless1k``) and on the JPEG-degraded test set (first ``--test-limit``
images), and rewrites

* the checkpoint ``--out`` (default ``benchmarks/results/vit_cifar.pt``, not committed):
  ``{"model": "vit_cifar", "config": {...}, "state_dict": ..., "epochs": n,
  "test_acc": {"exact1k": a, "jpeg": b}, "history": [...]}``; rebuild the model with
  ``oba_fx.models.load_vit_cifar(path)`` (or ``get_model("vit_cifar", weights=path)`` for the
  default size);
* a JSON summary beside it, ``<stem>_train.json`` (default ``vit_cifar_train.json``, committed):
  settings, machine, per-epoch history with seconds per epoch, final accuracies.

So an interrupted run leaves the last finished epoch's model (the learning-rate schedule is not
resumable; rerun from scratch).

Usage::

    python benchmarks/train_vit_cifar.py --data DIR [--epochs 10] [--threads 2] [--train-limit N]
        [--test-limit N] [--out benchmarks/results/vit_cifar.pt]

The data folder is ``--data`` or ``$OBA_FX_DATA`` (see ``oba_fx.data.data_dir``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402  (benchmarks/ is not a package)

log = logging.getLogger("train_vit_cifar")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and convolution kernels only (not biases, norms or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in ("cls_token", "pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per optimizer step: linear warm-up from ~0 to 1, then cosine from 1 to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default: $OBA_FX_DATA)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images (default all 50k)")
    p.add_argument("--test-limit", type=int, default=None, help="first N images of the JPEG test set (all 10k)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=256)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/vit_cifar.pt", help="checkpoint file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar; log every --log-every steps instead")
    p.add_argument("--log-every", type=int, default=50, help="with --no-progress: steps between log lines (0: none)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    torch.set_num_threads(args.threads)
    from oba_fx.data import cifar10_loader, data_dir
    from oba_fx.evaluate import evaluate
    from oba_fx.finetune import train_epoch
    from oba_fx.io import atomic_save
    from oba_fx.models.vit_cifar import vit_cifar

    ddir = data_dir(args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_path = out.with_name(f"{out.stem}_train.json")

    torch.manual_seed(args.seed)
    train_loader = cifar10_loader(ddir, "train", args.batch_size, limit=args.train_limit, shuffle=True,
                                  augment=True, seed=args.seed)
    test_loaders = {
        "exact1k": cifar10_loader(ddir, "test_lossless1k", args.eval_batch_size),
        "jpeg": cifar10_loader(ddir, "test", args.eval_batch_size, limit=args.test_limit),
    }
    model = vit_cifar(dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim, patch=args.patch)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * args.epochs
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    summary: dict[str, Any] = {
        "benchmark": "train_vit_cifar",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k != "data"},
                     "train_images": len(train_loader.dataset), "test_images": len(test_loaders["jpeg"].dataset),
                     "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
                     "optimizer": "AdamW (no decay on biases, norms, cls_token, pos_embed)",
                     "schedule": "per-step linear warm-up, then cosine to 0"},
        "model": "vit_cifar", "config": model.config, "params": n_params,
        "checkpoint": out.name, "history": [], "complete": False,
    }
    log.info("vit_cifar %s: %d parameters; %d training images, %d steps/epoch, %d epochs",
             model.config, n_params, len(train_loader.dataset), steps_per_epoch, args.epochs)

    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        stats = train_epoch(model, train_loader, opt, loss_fn=loss_fn, scheduler=sched, progress=not args.no_progress,
                            desc=f"epoch {epoch}/{args.epochs}", log_every=args.log_every if args.no_progress else 0)
        train_s = stats["seconds"]
        t1 = time.perf_counter()
        acc = {name: evaluate(model, ld) for name, ld in test_loaders.items()}
        eval_s = time.perf_counter() - t1
        row = {"epoch": epoch, "train_loss": stats["loss"], "train_acc": stats["accuracy"],
               "lr_end": opt.param_groups[0]["lr"], "train_s": train_s, "eval_s": eval_s, **acc}
        summary["history"].append(row)
        log.info("epoch %d/%d: train loss %.4f, train acc %.4f, test exact1k %.4f, jpeg %.4f "
                 "(train %.0f s, eval %.0f s)", epoch, args.epochs, row["train_loss"], row["train_acc"],
                 acc["exact1k"], acc["jpeg"], train_s, eval_s)
        atomic_save({"model": "vit_cifar", "config": model.config, "state_dict": model.state_dict(),
                     "epochs": epoch, "test_acc": acc, "history": summary["history"]}, out)
        summary.update(epochs_done=epoch, test_acc=acc, elapsed_s=time.perf_counter() - t_start,
                       train_s_per_epoch=sum(h["train_s"] for h in summary["history"]) / epoch)
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, summary_path)
    summary["complete"] = True
    summary["wall_s"] = time.perf_counter() - t_start
    summary_path.write_text(json.dumps(summary, indent=1))
    log.info("done in %.1f min: exact1k %.4f, jpeg %.4f; wrote %s and %s", summary["wall_s"] / 60,
             summary["test_acc"]["exact1k"], summary["test_acc"]["jpeg"], out, summary_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
