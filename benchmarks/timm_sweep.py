"""Prune one model of each timm family and classify what happens.

Every model is built with ``timm.create_model(name, pretrained=False)`` (random weights: the
sweep is about structure, not accuracy), put in eval mode and pruned, in its own subprocess
with one torch thread and a timeout, on one example batch of its default input size::

    oba_fx.prune_graph(model, (x,), target_flops=0.9)       # criterion "l1", verification on

(``--target channels:0.3`` runs ``channel_ratio=0.3`` instead). When that removes nothing or
cannot reach the target because every prunable channel is in a residual stream (RepVGG: every
block adds two convolutions), the model is pruned again with ``keep_residual=False``, and the
table says so. A FLOPs target asks the sweep's
question directly; with a channel ratio, models whose prunable channels carry few FLOPs (the
residual streams are kept by default) land above 0.9 without anything being wrong.

Outcomes (one per model):

* ``pruned``: verified (slimmed == masked original) and FLOPs after <= 0.9 of before;
* ``pruned-above-0.9``: verified, some units removed, but FLOPs after > 0.9 of before;
* ``nothing-prunable``: verified, but every unit was pinned (nothing removed);
* ``refused``: the library declined with an ``OBAError`` (its message is recorded; an
  unreachable FLOPs target is one);
* ``wrong``: ``VerificationError`` (the slimmed network differs from the masked original), or
  the slimmed network's output shape differs from the model's;
* ``crashed``: any other exception; ``timeout``: the subprocess ran past ``--timeout``.

    python benchmarks/timm_sweep.py [--target flops:0.9] [--only NAME ...] [--timeout 900]
        [--out benchmarks/results/timm_sweep]

Writes ``<out>.json`` (every model: family, input size, outcome, FLOPs, error, barriers,
seconds; with ``--only`` the named models are re-run and merged into the existing file) and
``<out>.md`` (the table), and prints the table.

Example:
    >>> classify({"ok": True, "flops_before": 100, "flops_after": 80, "units_removed": 3})
    'pruned'
    >>> classify({"ok": False, "error_type": "VerificationError", "oba": False})
    'wrong'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

#: (family, timm model name): one model per family
MODELS = [
    ("ResNet", "resnet18"), ("ResNet-D", "resnet26d"), ("ResNeXt-TS", "resnext26ts"),
    ("SE-ResNeXt", "seresnext26d_32x4d"), ("Res2Net", "res2net50_14w_8s"), ("ResNeSt", "resnest14d"),
    ("RegNetX", "regnetx_002"), ("RegNetY", "regnety_002"), ("CSPResNet", "cspresnet50"),
    ("CSPDarkNet", "cspdarknet53"), ("DarkNet", "darknet17"), ("DPN", "dpn48b"), ("DenseNet", "densenet121"),
    ("Inception-v3", "inception_v3"), ("Xception", "xception41"), ("RepVGG", "repvgg_a0"),
    ("VoVNet", "vovnet39a"), ("ESE-VoVNet", "ese_vovnet19b_dw"), ("NASNet", "nasnetalarge"),
    ("DLA", "dla34"), ("HRNet", "hrnet_w18_small"), ("SelecSLS", "selecsls42b"), ("TResNet", "tresnet_m"),
    ("NF-ResNet", "nf_resnet26"), ("GENet", "gernet_s"), ("VGG", "vgg11"),
    ("MobileNetV2", "mobilenetv2_100"), ("MobileNetV3", "mobilenetv3_small_100"),
    ("EfficientNet", "efficientnet_b0"), ("EfficientNet-Lite", "efficientnet_lite0"),
    ("GhostNet", "ghostnet_100"), ("MnasNet", "mnasnet_100"), ("ReXNet", "rexnet_100"),
    ("MixNet", "tf_mixnet_s"), ("FBNet", "fbnetc_100"), ("HardCoReNAS", "hardcorenas_a"),
    ("LCNet", "lcnet_050"), ("TinyNet", "tinynet_a"), ("ConvNeXt", "convnext_atto"),
    ("EdgeNeXt", "edgenext_xx_small"), ("MobileViT", "mobilevit_xxs"), ("MobileViTv2", "mobilevitv2_050"),
    ("EfficientFormer", "efficientformer_l1"), ("PoolFormer", "poolformer_s12"), ("ViT", "vit_tiny_patch16_224"),
    ("DeiT", "deit_tiny_patch16_224"), ("CaiT", "cait_xxs24_224"), ("PiT", "pit_ti_224"),
    ("CrossViT", "crossvit_tiny_240"), ("Swin", "swin_tiny_patch4_window7_224"), ("LeViT", "levit_128s"),
    ("CoaT", "coat_lite_tiny"), ("MLP-Mixer", "mixer_s16_224"), ("ResMLP", "resmlp_12_224"),
]
OUTCOMES = ["pruned", "pruned-above-0.9", "nothing-prunable", "refused", "wrong", "crashed", "timeout"]
FLOPS_GOAL = 0.9
DEFAULT_TARGET = "flops:0.9"


def target_kwargs(target: str) -> dict[str, float]:
    """``"flops:0.9"`` -> ``{"target_flops": 0.9}``, ``"channels:0.3"`` -> ``{"channel_ratio": 0.3}``.

    Example:
        >>> target_kwargs("channels:0.3")
        {'channel_ratio': 0.3}
    """
    kind, value = target.split(":")
    return {{"flops": "target_flops", "params": "target_params", "channels": "channel_ratio"}[kind]: float(value)}


def call_text(target: str) -> str:
    """The ``prune_graph`` call of the sweep, as text."""
    (k, v), = target_kwargs(target).items()
    return f"prune_graph(model, (x,), {k}={v})"


def classify(rec: dict[str, Any]) -> str:
    """The outcome of one model's record (see the module doc)."""
    if not rec.get("ok"):
        if rec.get("error_type") == "VerificationError":
            return "wrong"
        return "refused" if rec.get("oba") else "crashed"
    if not rec.get("same_output_shape", True):
        return "wrong"
    if rec["units_removed"] == 0:
        return "nothing-prunable"
    return "pruned" if rec["flops_after"] <= FLOPS_GOAL * rec["flops_before"] else "pruned-above-0.9"


def run_one(name: str, target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """Build, prune and check one timm model in this process."""
    import torch
    import timm

    import oba_fx
    from oba_fx.errors import BadInputError, OBAError

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    rec: dict[str, Any] = {"input_size": list(size), "keep_residual": True}
    t0 = time.perf_counter()
    try:
        try:
            out = oba_fx.prune_graph(model, (x,), verbose=False, **target_kwargs(target))
            if out.meta["oba"]["units_removed"] == 0:
                raise BadInputError("nothing removed with the residual streams kept")
        except BadInputError as e:
            if "unreachable" not in str(e) and "nothing removed" not in str(e):
                raise
            rec.update(keep_residual=False, first_try=str(e).splitlines()[0][:200])
            out = oba_fx.prune_graph(model, (x,), verbose=False, keep_residual=False, **target_kwargs(target))
    except Exception as e:  # noqa: BLE001 - the sweep classifies every failure
        rec.update(ok=False, oba=isinstance(e, OBAError), error_type=type(e).__name__,
                   detail=" | ".join(str(e).splitlines()[:2])[:400])
    else:
        r = out.meta["oba"]
        with torch.no_grad():
            want, got = model(x), out(x)
        rec.update(ok=True, flops_before=r["flops_before"], flops_after=r["flops_after"],
                   params_before=r["params_before"], params_after=r["params_after"],
                   units_prunable=r["units_prunable"], units_removed=r["units_removed"],
                   max_rel_error=r["max_rel_error"], barriers=len(r["barriers"]),
                   barrier_ops=sorted({str(b["target"])[:40] for b in r["barriers"]})[:8],
                   specialised=r.get("specialised") is not None,
                   same_output_shape=tuple(want.shape) == tuple(got.shape))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def run_in_subprocess(family: str, name: str, timeout: float, target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """:func:`run_one` in a fresh interpreter with one thread; its JSON record, classified."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, "--child", name, "--target", target], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=ROOT)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if lines:
            rec = json.loads(lines[-1])
        else:
            rec = {"ok": False, "oba": False, "error_type": f"exit {p.returncode}",
                   "detail": " | ".join(p.stderr.strip().splitlines()[-2:])[:400]}
        rec["outcome"] = classify(rec)
    except subprocess.TimeoutExpired:
        rec = {"ok": False, "outcome": "timeout", "detail": f"no result within {timeout:.0f} s"}
    rec.update(family=family, model=name, wall_seconds=round(time.perf_counter() - t0, 1))
    return rec


def table(records: list[dict[str, Any]]) -> str:
    """The markdown table and the outcome counts."""
    rows = ["| family | model | input | outcome | FLOPs after / before | params after / before | "
            "max rel. error | specialised | detail |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        flops = f"{r['flops_after'] / r['flops_before']:.3f}" if r.get("flops_before") else ""
        params = f"{r['params_after'] / r['params_before']:.3f}" if r.get("params_before") else ""
        err = f"{r['max_rel_error']:.1e}" if r.get("max_rel_error") is not None else ""
        size = "x".join(map(str, r.get("input_size", [])))
        detail = r.get("detail", "") or (f"{r['barriers']} barrier(s)" if r.get("barriers") else "")
        outcome = r["outcome"] + (" (keep_residual=False)" if r.get("keep_residual") is False else "")
        rows.append(f"| {r['family']} | {r['model']} | {size} | {outcome} | {flops} | {params} | {err} | "
                    f"{'yes' if r.get('specialised') else ''} | {detail.replace('|', '/')[:160]} |")
    counts = {o: sum(r["outcome"] == o for r in records) for o in OUTCOMES}
    summary = ", ".join(f"{o}: {n}" for o, n in counts.items() if n)
    return "\n".join(rows) + f"\n\n{len(records)} models: {summary}\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="re-run these models and merge them into --out's json")
    ap.add_argument("--target", default=DEFAULT_TARGET, help="flops:F, params:F or channels:R")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "timm_sweep"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import logging
        import warnings

        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        print(json.dumps(run_one(args.child, args.target)))
        return
    from _common import machine

    path = Path(args.out + ".json")
    old = {r["model"]: r for r in json.loads(path.read_text())["models"]} if args.only and path.exists() else {}
    todo = [(f, m) for f, m in MODELS if not args.only or m in args.only]
    for family, name in todo:
        old[name] = run_in_subprocess(family, name, args.timeout, args.target)
        r = old[name]
        print(f"{name:32s} {r['outcome']:18s} {r['wall_seconds']:7.1f} s  {r.get('detail', '')[:100]}", flush=True)
    records = [old[m] for _, m in MODELS if m in old]
    import timm
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "timm": timm.__version__, "torch": torch.__version__,
                                "call": call_text(args.target),
                                "models": records}, indent=1))
    md = table(records)
    Path(args.out + ".md").write_text(
        f"# timm sweep\n\n`oba_fx.{call_text(args.target)}` (criterion l1, verified), "
        f"timm {timm.__version__}, random weights, batch 1 at the default input size, one thread per model.\n\n"
        + md)
    print(md)


if __name__ == "__main__":
    main()
