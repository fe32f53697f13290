"""Regenerate the README's pictures (pretrained ResNet-56, pruned to half its FLOPs with L1) and
time every picture on ResNet-56, MobileNetV2 and ViT-B/16 (issue 14: under 10 s each).

    python benchmarks/pictures.py --data DIR     # DIR as for oba-fx prune (or $OBA_FX_DATA)

Writes ``docs/pictures/resnet56_*.png`` and ``benchmarks/results/pictures.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import oba_fx  # noqa: E402
from oba_fx.models import get_model  # noqa: E402
from oba_fx.passes.pipeline import analyze_model  # noqa: E402
from oba_fx.report import flops_by_module, layer_sizes, write_pictures  # noqa: E402

from _common import machine  # noqa: E402

SIZES = {"resnet56": 32, "mobilenet_v2": 224, "vit_b_16": 224}


def readme_pictures(data: Path, out: Path) -> dict:
    """Prune the pretrained ResNet-56 (L1, half the FLOPs) and keep its three pictures."""
    model = get_model("resnet56", weights=str(data / "weights" / "resnet56-4bfd9763.th")).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = oba_fx.prune_graph(model, x, criterion="l1", target_flops=0.5, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        write_pictures(analyze_model(model, (x,)), pruned.meta["oba"], tmp, "ResNet-56 (L1, 50 % FLOPs)")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("hessian_blocks", "dataflow", "removed"):
            shutil.copy(Path(tmp) / f"{name}.png", out / f"resnet56_{name}.png")
    return pruned.meta["oba"]["picture_seconds"]


def timings() -> dict:
    """Seconds per picture for each model (the removed chart of an unpruned report: same size)."""
    out = {}
    for name, size in SIZES.items():
        gm = analyze_model(get_model(name).eval(), (torch.randn(1, 3, size, size),))
        report = {"layers": layer_sizes(gm, gm), "flops_by_module": flops_by_module(gm, gm), "heads": {},
                  "flops_before": 1, "flops_after": 1}
        with tempfile.TemporaryDirectory() as tmp:
            write_pictures(gm, report, tmp, name)
        out[name] = report["picture_seconds"]
        print(name, out[name], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("OBA_FX_DATA"), help="folder with weights/ (or $OBA_FX_DATA)")
    args = p.parse_args()
    if not args.data:
        p.error("give --data DIR or set OBA_FX_DATA")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t = time.time()
    result = {"readme_resnet56_seconds": readme_pictures(Path(args.data), ROOT / "docs" / "pictures"),
              "seconds_per_picture": timings(), "machine": machine()}
    (ROOT / "benchmarks" / "results" / "pictures.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
