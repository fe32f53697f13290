"""Compensation on the pretrained ResNet-56: one-shot accuracy of masks only, BN recalibration,
least-squares compensation, and both in either order (issue 10; ``docs/design.md`` "Compensation").

Pipeline pieces used: ``analyze_model`` -> ``SelectPass`` (criterion ``l1``) -> ``CompensatePass``
-> ``SlimPass`` -> ``VerifyPass`` (against the compensated masked reference), and
``oba_fx.bn.recalibrate_bn``. Accuracy on the exact 1k test images; calibration = 512 training
images drawn with a seed. Selection variants: the default global L1 ranking, and the same with the
residual stream pinned (``frozen_modules`` = the stem BN and every block's ``bn2``: only inner
channels go), each optionally with ``max_layer_ratio``.

Compensation scope ``removed`` re-fits the layers that read removed units; ``all`` re-fits every
conv / linear layer (upstream error corrected everywhere).

    OBA_FX_DATA=/path/to/data python benchmarks/compensation.py [--variants default,inner] [--scopes removed,all]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine  # noqa: E402
from oba_fx import meta as M  # noqa: E402
from oba_fx.bn import recalibrate_bn  # noqa: E402
from oba_fx.data import cifar10_loader, data_dir, normalize  # noqa: E402
from oba_fx.evaluate import evaluate  # noqa: E402
from oba_fx.masking import masked_reference  # noqa: E402
from oba_fx.models import get_model  # noqa: E402
from oba_fx.passes import CompensatePass, ScorePass, SelectPass, SlimPass, VerifyPass  # noqa: E402
from oba_fx.compensate import compensate  # noqa: E402
from oba_fx.ops import count_flops  # noqa: E402
from oba_fx.passes.pipeline import analyze_model  # noqa: E402
from oba_fx.select import Target  # noqa: E402
from oba_fx.tracing import clone  # noqa: E402


def calibration(root: Path, n: int, seed: int, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    d = np.load(root / "cifar10_train.npz")
    idx = np.sort(np.random.default_rng(seed).choice(len(d["y"]), n, replace=False))
    x, y = normalize(d["x"][idx]), torch.from_numpy(d["y"][idx])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def slim_verified(gm, x0):
    c, sel = gm.meta[M.COUPLING], gm.meta[M.SELECTION]
    ref = masked_reference(gm, c, sel.removed)
    out = SlimPass((x0,))(gm).graph_module
    VerifyPass(ref, (x0,), rtol=1e-4)(out)
    return out


def run_variant(model, frozen, max_layer_ratio, calib, test, x0, ridge, positions, scope, log) -> dict:
    def selected():
        gm = analyze_model(model, (x0,), frozen_modules=frozen)
        ScorePass("l1")(gm)
        SelectPass(Target("flops", 0.5, max_layer_ratio=max_layer_ratio))(gm)
        return gm

    row: dict = {}
    gm = selected()
    flops0 = count_flops(gm)
    base = _with_meta(gm)  # the selected graph with the dense weights, kept for every arm
    a = slim_verified(_with_meta(base), x0)
    row["flops_ratio"] = count_flops(a) / flops0
    row["params"] = sum(p.numel() for p in a.parameters())
    row["units_removed"] = int(gm.meta[M.SELECTION].removed.sum())
    row["a_masks"] = evaluate(a, test)
    row["b_masks_bn"] = evaluate(recalibrate_bn(a, calib), test)
    log(f"  (a) masks {row['a_masks']:.3f}  (b) +BN {row['b_masks_bn']:.3f}  flops {row['flops_ratio']:.3f}")

    g = _with_meta(base)
    t = time.perf_counter()
    CompensatePass(calib, positions=positions, ridge=ridge, scope=scope, progress=False)(g)
    row["compensation_seconds"] = time.perf_counter() - t
    rec = g.meta[M.COMPENSATION]
    row["layers_refit"], row["layers_skipped"] = len(rec.fits), len(rec.skipped)
    row["calib_output_rel_error"] = rec.output_rel_error
    cmp = slim_verified(g, x0)
    row["verified_rel_error"] = cmp.meta[M.VERIFIED]
    row["c_comp"] = evaluate(cmp, test)
    row["d_comp_then_bn"] = evaluate(recalibrate_bn(cmp, calib), test)
    log(f"  (c) +comp {row['c_comp']:.3f}  (d) comp->BN {row['d_comp_then_bn']:.3f}  "
        f"{len(rec.fits)} layers in {row['compensation_seconds']:.1f}s")

    # (e) BN recalibration of the masked network first, then compensation towards the dense network
    g = _with_meta(base)
    masked = masked_reference(g, g.meta[M.COUPLING], g.meta[M.SELECTION].removed)
    recalibrate_bn(masked, calib)
    bn_state = {k: v for k, v in masked.state_dict().items() if "running_" in k}
    g.load_state_dict(bn_state, strict=False)
    compensate(g, g.meta[M.COUPLING], g.meta[M.SELECTION].removed, calib, positions=positions, ridge=ridge,
               scope=scope, progress=False, reference=base)
    row["e_bn_then_comp"] = evaluate(slim_verified(g, x0), test)
    log(f"  (e) BN->comp {row['e_bn_then_comp']:.3f}")
    return row


def _with_meta(base):
    g = clone(base)
    for k in (M.COUPLING, M.SELECTION):
        g.meta[k] = base.meta[k]
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default,inner,inner_cap")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", type=int, default=96)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--scopes", default="removed,all", help="compensation scopes to run, comma-separated")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compensation.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = data_dir(os.environ.get("OBA_FX_DATA"))
    model = get_model("resnet56", weights=root / "weights" / "resnet56-4bfd9763.th").eval()
    test = cifar10_loader(root, "test_lossless1k", batch_size=250)
    calib = calibration(root, args.calib, args.seed)
    x0 = calib[0][0][:2]
    dense = evaluate(model, test)
    print(f"dense {dense:.3f} on the exact 1k test images; calibration {args.calib} train images (seed {args.seed})")
    residual = ["bn1"] + [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(9)]
    variants = {
        "default": ((), 0.95),           # global L1 ranking over every prunable group
        "default_cap": ((), 0.6),        # the same, no layer loses more than 60 %
        "inner": (residual, 0.95),       # residual stream pinned: only the blocks' inner channels
        "inner_cap": (residual, 0.6),
    }
    results = {"settings": vars(args) | {"dense": dense, "target_flops": 0.5, "criterion": "l1"},
               "machine": machine(), "rows": {}}
    for scope in args.scopes.split(","):
        for name in args.variants.split(","):
            frozen, cap = variants[name]
            print(f"{name}: frozen={'residual stream' if frozen else 'none'} max_layer_ratio={cap} scope={scope}")
            t = time.perf_counter()
            row = run_variant(model, frozen, cap, calib, test, x0, args.ridge, args.positions, scope, print)
            row["variant_seconds"] = time.perf_counter() - t
            results["rows"][f"{name}/{scope}"] = row
    cols = ["a_masks", "b_masks_bn", "c_comp", "d_comp_then_bn", "e_bn_then_comp"]
    print("\n| selection / compensation scope | FLOPs | (a) masks | (b) +BN recal | (c) +comp | (d) comp→BN | (e) BN→comp | comp s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["rows"].items():
        print(f"| {name} | {r['flops_ratio']:.3f} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols)
              + f" | {r['compensation_seconds']:.1f} |")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
