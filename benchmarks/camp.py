"""CAMP-HiVe against OBA, Taylor and magnitude on pretrained CIFAR-10 ResNets, one-shot.

For each model (pretrained ResNet-20 / ResNet-56, ``$OBA_FX_DATA/weights``):

* the importance inputs are computed **once** on the calibration batches and timed: power
  iteration (``oba_fx.power_iteration``, top eigenvector of the full loss Hessian), OBA scores
  (``θ ⊙ Hθ``, full Hessian), Taylor scores (``θ ⊙ g``);
* **unstructured** (``oba_fx.prune_unstructured``, conv + linear weights) at sparsity 50/70/90 %:
  magnitude (global and per-layer), Taylor and OBA (global), camp per-layer (the paper's per-tensor
  percentile), camp with curvature-adaptive thresholds, the same with cyclic pair merging, and
  ``|v|·|θ|`` adaptive;
* **structured** (``passes.pipeline.prune`` on the analysed graph with the same scores) at
  retained FLOPs 0.7 / 0.5: L1, Taylor, OBA, camp, camp + structured merging (cyclic and
  most-similar partner). Every structured result is verified (slimmed == merged-masked).

Accuracy is top-1 on the 1,000 exact (lossless) CIFAR-10 test images (±0.8 points, 1 s.d.),
one-shot: no BatchNorm recalibration, no fine-tuning.

    python benchmarks/camp.py [--models resnet20 resnet56] [--calib-batches 2] [--iters 20]

Writes ``benchmarks/results/camp.json``, ``camp.md`` and ``camp.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

log = logging.getLogger("camp_bench")
HERE = Path(__file__).resolve().parent

#: unstructured rows: label -> prune_unstructured options (criterion key into the precomputed inputs)
UNSTRUCTURED = {
    "magnitude (global)": dict(criterion="l1", scope="global"),
    "magnitude (layer)": dict(criterion="l1", scope="layer"),
    "random (layer)": dict(criterion="random", scope="layer"),
    "taylor (global)": dict(criterion="taylor", scope="global"),
    "oba (global)": dict(criterion="oba", scope="global"),
    "camp |v| (layer)": dict(criterion="camp", scope="layer", times_theta=False),
    "camp |v| (adaptive)": dict(criterion="camp", scope="adaptive", times_theta=False),
    "camp |v| (adaptive) + merge": dict(criterion="camp", scope="adaptive", times_theta=False, merge=True),
    "camp |v|·|θ| (layer)": dict(criterion="camp", scope="layer", times_theta=True),
    "camp |v|·|θ| (adaptive)": dict(criterion="camp", scope="adaptive", times_theta=True),
    "camp |v|·|θ| (adaptive) + merge": dict(criterion="camp", scope="adaptive", times_theta=True, merge=True),
}
#: structured rows: label -> (scores key, merge)
STRUCTURED = {
    "l1": ("l1", None),
    "taylor": ("taylor", None),
    "oba": ("oba", None),
    "camp |v|": ("camp", None),
    "camp |v|·|θ|": ("camp_theta", None),
    "camp |v| + merge (cyclic)": ("camp", ("cyclic", 0.5)),
    "camp |v| + merge (similar)": ("camp", ("similar", 0.5)),
    "l1 + merge (cyclic)": ("l1", ("cyclic", 0.5)),
}


def _timed(fn, *a, **k):
    t = time.time()
    out = fn(*a, **k)
    return out, round(time.time() - t, 1)


def precompute(model, calib, args) -> tuple[dict[str, Any], dict[str, float], dict]:
    """Power iteration, OBA and Taylor scores, once per model."""
    import oba_fx
    from oba_fx.criteria.camp import camp_importance

    pi, t_pi = _timed(oba_fx.power_iteration, model, calib, k=1, iters=args.iters, tol=args.tol, seed=0,
                      hessian="full")
    oba, t_oba = _timed(oba_fx.score, model, calib, criterion="oba", hessian="full")
    taylor, t_taylor = _timed(oba_fx.score, model, calib, criterion="taylor")
    l1 = {n: p.detach().abs() for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    camp = camp_importance(pi, params, times_theta=False)
    camp_theta = camp_importance(pi, params, times_theta=True)
    return ({"pi": pi, "oba": oba, "taylor": taylor, "l1": l1, "camp": camp, "camp_theta": camp_theta, "random": None},
            {"power_iteration": t_pi, "oba": t_oba, "taylor": t_taylor}, pi.report())


def unstructured_rows(model, inputs, test, args) -> list[dict]:
    import oba_fx
    from oba_fx.evaluate import evaluate

    rows = []
    for s in args.sparsities:
        for label, opt in UNSTRUCTURED.items():
            crit = opt["criterion"]
            pre = inputs["pi"] if crit == "camp" else inputs[crit]
            gm, sec = _timed(oba_fx.prune_unstructured, model, None, sparsity=s, precomputed=pre, progress=False,
                             **opt)
            acc = evaluate(gm, test)
            rep = gm.meta["oba"]
            rows.append({"kind": "unstructured", "method": label, "target": s, "acc": acc,
                         "sparsity": rep["total"]["sparsity"], "prune_seconds": sec})
            log.info("unstructured %.2f %-32s acc %.3f (sparsity %.4f)", s, label, acc, rep["total"]["sparsity"])
    return rows


def structured_rows(model, x, inputs, test, args) -> list[dict]:
    from oba_fx.evaluate import evaluate
    from oba_fx.passes.pipeline import analyze_model, prune
    from oba_fx.select import Target

    rows = []
    for r in args.flops:
        for label, (key, merge) in STRUCTURED.items():
            t = time.time()
            gm = analyze_model(model, (x,))
            out = prune(gm, (x,), inputs[key], Target("flops", r), merge=merge)
            sec = round(time.time() - t, 1)
            rep = out.meta["oba"]
            acc = evaluate(out, test)
            rows.append({"kind": "structured", "method": label, "target": r, "acc": acc,
                         "flops_ratio": rep["flops_after"] / rep["flops_before"],
                         "params_ratio": rep["params_after"] / rep["params_before"],
                         "verify_rel_error": rep.get("max_rel_error"), "merge": rep.get("merge"),
                         "prune_seconds": sec})
            log.info("structured flops %.2f %-26s acc %.3f (flops %.3f, verify %.2e)", r, label, acc,
                     rows[-1]["flops_ratio"], rows[-1]["verify_rel_error"] or 0.0)
    return rows


def run_model(name: str, ddir: Path, args) -> dict[str, Any]:
    from oba_fx.data import cifar10_loader
    from oba_fx.evaluate import evaluate
    from oba_fx.models import get_model

    weights = next((ddir / "weights").glob(f"{name}-*.th"))
    model = get_model(name, weights=weights).eval()
    loader = cifar10_loader(ddir, "train", args.calib_batch_size, shuffle=True, seed=args.seed)
    calib = []
    for b in loader:
        calib.append(b)
        if len(calib) == args.calib_batches:
            break
    test = cifar10_loader(ddir, "test_lossless1k", 250)
    dense = evaluate(model, test)
    log.info("%s dense acc %.3f", name, dense)
    inputs, timings, pi_report = precompute(model, calib, args)
    log.info("%s precompute %s; power iteration %s", name, timings, pi_report)
    rows = unstructured_rows(model, inputs, test, args) + structured_rows(model, calib[0][0][:2], inputs, test, args)
    return {"model": name, "dense_acc": dense, "precompute_seconds": timings, "power_iteration": pi_report,
            "rows": rows}


# ------------------------------------------------------------------------------ outputs
def write_markdown(result: dict[str, Any], path: Path) -> None:
    s = result["settings"]
    lines = ["# CAMP-HiVe vs OBA / Taylor / magnitude (one-shot)", "",
             f"Settings: {s['calib_batches']} calibration batches of {s['calib_batch_size']} training images "
             f"(JPEG-degraded set, seed {s['seed']}); accuracy on the 1,000 exact CIFAR-10 test images "
             "(±0.8 points, 1 s.d.); one-shot (no BN recalibration, no fine-tuning). Power iteration: k=1, full "
             f"Hessian, at most {s['iters']} products, tol {s['tol']}. torch threads: {s['machine']['torch_threads']}; "
             f"CPU: {s['machine']['cpu']} (shared with other jobs; times are indicative).", ""]
    for m in result["models"]:
        pi = m["power_iteration"]["pairs"][0]
        lines += [f"## {m['model']} (dense {100 * m['dense_acc']:.1f} %)", "",
                  f"Precompute (s): {m['precompute_seconds']}. Power iteration: λ₁ = {pi['eigenvalue']:.4g} after "
                  f"{pi['iterations']} products, relative residual {pi['relative_residual']:.2e} "
                  f"({'converged' if pi['converged'] else 'NOT converged'} at tol {s['tol']}).", ""]
        for kind, tkey, tname in (("unstructured", "target", "sparsity"), ("structured", "target", "retained FLOPs")):
            rows = [r for r in m["rows"] if r["kind"] == kind]
            targets = sorted({r[tkey] for r in rows})
            methods = list(dict.fromkeys(r["method"] for r in rows))
            lines += [f"### {kind} (columns: {tname})", "",
                      "| method | " + " | ".join(f"{t:g}" for t in targets) + " |",
                      "|---|" + "---:|" * len(targets)]
            for meth in methods:
                cells = []
                best = {t: max(r["acc"] for r in rows if r[tkey] == t) for t in targets}
                for t in targets:
                    r = next(r for r in rows if r["method"] == meth and r[tkey] == t)
                    c = f"{100 * r['acc']:.1f}"
                    cells.append(f"**{c}**" if r["acc"] == best[t] else c)
                lines.append(f"| {meth.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, (kind, xl) in enumerate((("unstructured", "sparsity"), ("structured", "retained FLOPs"))):
            ax = axes[i][j]
            rows = [r for r in m["rows"] if r["kind"] == kind]
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
            for meth in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["target"], 100 * r["acc"]) for r in rows if r["method"] == meth)
                ax.plot(*zip(*pts), marker="o", label=meth, ls="-" if meth.startswith("camp") else "--")
            ax.axhline(100 * m["dense_acc"], color="k", lw=0.8, ls=":", label="dense")
            ax.set_title(f"{m['model']}: {kind}, one-shot")
            ax.set_xlabel(xl)
            ax.set_ylabel("top-1 on 1k exact test images (%)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data folder (default: $OBA_FX_DATA)")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--calib-batches", type=int, default=2)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=30, help="most power-iteration products")
    p.add_argument("--tol", type=float, default=1e-2)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--flops", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "camp"))
    p.add_argument("--replot", action="store_true", help="only rewrite the table and plot from OUT.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from oba_fx.data import data_dir

    if args.replot:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_markdown(result, Path(args.out).with_suffix(".md"))
        write_plot(result, Path(args.out).with_suffix(".png"))
        return 0
    ddir = data_dir(args.data)
    t0 = time.time()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data")}
    settings["machine"] = machine()
    result = {"settings": settings, "models": []}
    out = Path(args.out)
    for name in args.models:
        result["models"].append(run_model(name, ddir, args))
        result["seconds"] = round(time.time() - t0, 1)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # partial results survive
    write_markdown(result, out.with_suffix(".md"))
    write_plot(result, out.with_suffix(".png"))
    log.info("wrote %s.{json,md,png} in %.0f s", out, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
