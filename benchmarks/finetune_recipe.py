"""The dense reference for pruning + fine-tuning: the pretrained model given the paper's fine-tuning recipe.

A pruned and fine-tuned network should be compared with the *dense* network given the same
fine-tuning, not only with the dense network as downloaded: our training images are JPEG-degraded
copies (``shared/data/README.md``), and an epoch on them can move a model trained on exact images.
This script measures exactly that, with and without self-distillation:

* ``dense``: the pretrained model (default ResNet-56, ``oba_fx.models.get_model(..., weights=...)``);
* ``plain``: the dense model after ``--epochs`` of ``oba_fx.finetune.finetune`` with the OBA
  paper's recipe (SGD, lr ``--lr`` 1e-3, momentum 0.9, weight decay 5e-4, batch 64, random crop
  with 4-pixel padding and horizontal flip: ``cifar10_loader(..., augment=True)``) on the first
  ``--train-limit`` training images (default all 50,000), cross-entropy on the labels;
* ``distill``: the same with ``teacher=`` the original dense model (self-distillation,
  ``oba_fx.finetune.distillation_loss``, ``--temperature`` 4, ``--distill-weight`` 0.9).

Both runs see the same images in the same order with the same augmentation draws (seeded).
Accuracy: top-1 on the 1,000 exact test images (``test_lossless1k``; 1 s.d. about 0.8 points) and
on the first ``--test-limit`` (default 3,000) JPEG-degraded test images.

Output: a table on stdout and ``<out>/<name>.json`` (settings, machine, per-variant accuracy,
training loss and seconds), rewritten after every variant.

Usage::

    python benchmarks/finetune_recipe.py --data DIR [--train-limit N] [--epochs 1] [--threads 1]
        [--variants plain distill] [--test-limit 3000] [--out benchmarks/results] [--name finetune_recipe]

The data folder is ``--data`` or ``$OBA_FX_DATA`` (see ``oba_fx.data.data_dir``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402  (benchmarks/ is not a package)

log = logging.getLogger("finetune_recipe")

WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
           "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}
VARIANTS = ("plain", "distill")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default: $OBA_FX_DATA)")
    p.add_argument("--model", default="resnet56", choices=sorted(WEIGHTS))
    p.add_argument("--weights", default=None, help="checkpoint (default: <data>/weights/<upstream name>)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--distill-weight", type=float, default=0.9)
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images (default all 50k)")
    p.add_argument("--test-limit", type=int, default=3000, help="first N images of the JPEG test set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="tqdm bar over the training batches")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="finetune_recipe")
    p.add_argument("--note", default="", help="free text stored with the settings")
    return p.parse_args(argv)


def accuracies(model: torch.nn.Module, loaders: dict[str, Any]) -> tuple[dict[str, float], float]:
    from oba_fx.data import evaluate

    t = time.perf_counter()
    return {name: evaluate(model, ld) for name, ld in loaders.items()}, time.perf_counter() - t


def train_variant(dense: torch.nn.Module, variant: str, args, ddir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``dense`` fine-tuned by the recipe (with ``dense`` as teacher for ``distill``)."""
    from oba_fx.data import cifar10_loader
    from oba_fx.finetune import finetune

    model = copy.deepcopy(dense)
    torch.manual_seed(args.seed + 1)  # the same augmentation draws for every variant
    loader = cifar10_loader(ddir, "train", args.batch_size, limit=args.train_limit, shuffle=True, augment=True,
                            seed=args.seed)
    distill = ({"teacher": dense, "temperature": args.temperature, "distill_weight": args.distill_weight}
               if variant == "distill" else {})
    t = time.perf_counter()
    res = finetune(model, loader, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, progress=args.progress, **distill)
    seconds = time.perf_counter() - t
    return model.eval(), {"train_loss": list(res.train_loss), "lr": list(res.lr), "train_s": seconds,
                          "train_images": len(loader.dataset), "batches_per_epoch": len(loader),
                          "s_per_1k_images": 1000 * seconds / (args.epochs * len(loader.dataset))}


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = f"{'model':36s} {'exact 1k %':>10s} {'JPEG ' + str(s['jpeg_images']) + ' %':>12s} {'train s':>8s}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        acc = row["acc"]
        train = f"{row['train_s']:8.0f}" if "train_s" in row else f"{'':8s}"
        lines.append(f"{row['label']:36s} {100 * acc['exact1k']:10.1f} {100 * acc['jpeg']:12.2f} {train}")
    return "\n".join(lines)


def save(result: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def settings(args, ddir: Path, weights: Path, loaders: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in vars(args).items() if k != "data"}, "weights_file": weights.name,
            "jpeg_images": len(loaders["jpeg"].dataset), "exact_images": len(loaders["exact1k"].dataset),
            "recipe": "oba_fx.finetune.finetune: SGD, multi-step schedule (milestones [epochs//2, 3*epochs//4]), "
                      "random crop (pad 4) + flip on the JPEG-degraded training set",
            "teacher": "the pretrained dense model itself (self-distillation), eval mode"}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    torch.set_num_threads(args.threads)
    from oba_fx.data import cifar10_loader, data_dir
    from oba_fx.models import get_model

    ddir = data_dir(args.data)
    weights = Path(args.weights) if args.weights else ddir / "weights" / WEIGHTS[args.model]
    dense = get_model(args.model, weights=str(weights)).eval()
    loaders = {"exact1k": cifar10_loader(ddir, "test_lossless1k", 500),
               "jpeg": cifar10_loader(ddir, "test", 500, limit=args.test_limit)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "finetune_recipe", "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine(),
        "settings": settings(args, ddir, weights, loaders), "rows": [], "complete": False}
    acc, eval_s = accuracies(dense, loaders)
    result["rows"].append({"variant": "dense", "label": f"dense {args.model}", "acc": acc, "eval_s": eval_s})
    log.info("dense: %s (%.0f s)", acc, eval_s)
    save(result, out / f"{args.name}.json")
    for variant in args.variants:
        model, row = train_variant(dense, variant, args, ddir)
        row["acc"], row["eval_s"] = accuracies(model, loaders)
        what = "+ self-distillation" if variant == "distill" else "(labels only)"
        row.update(variant=variant, label=f"dense + {args.epochs} ep {what}")
        result["rows"].append(row)
        log.info("%s: %s (train %.0f s)", variant, row["acc"], row["train_s"])
        save(result, out / f"{args.name}.json")
    result["complete"] = True
    save(result, out / f"{args.name}.json")
    print(table(result))
    print(f"(training on {result['rows'][-1].get('train_images', 0)} images, {args.threads} thread(s); "
          f"wrote {out / (args.name + '.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
