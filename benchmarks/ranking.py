"""Which ranking wins once removal is compensated? One-shot quality on pretrained CIFAR ResNets.

For each model, retained-FLOPs target and calibration seed, every criterion prunes the dense
pretrained model one-shot with ``oba_fx.prune_graph`` and the library defaults (residual streams
kept, scores of ``--calib`` training images drawn with that seed), with compensation (the default
with data: every conv/linear re-fit by least squares, no BN recalibration) and, for the criteria
in ``--uncompensated``, without it (then BatchNorm statistics are re-estimated on the same
images, the library's default without compensation). Accuracy: the 1,000 exact test images and
the JPEG test images (all 10,000, or the first ``--jpeg``; each JSON's settings say which). Each seed draws its own ``--calib`` training images. Reported per cell: mean and spread (max − min) over the
seeds; "beats" in the Markdown means the difference of means exceeds the sum of the two
half-spreads.

Usage::

    python benchmarks/ranking.py --data DIR [--models resnet56 resnet20] [--ratios 0.7 0.5 0.35]
        [--criteria l1 taylor oba oba-full obs] [--seeds 0 1 2] [--threads 1]

Writes ``benchmarks/results/ranking.json`` (rewritten after every cell), ``ranking.md`` and
``ranking.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import oba_fx
from _common import compare
from oba_fx.data import cifar10_loader, data_dir, load_cifar10_npz
from oba_fx.evaluate import evaluate
from oba_fx.models import get_model

WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
#: spec -> (criterion, extra prune_graph keywords)
#: ``taylor``, ``oba``, ``oba-full`` and ``obs`` pin the rankings they were first measured with (the
#: defaults then: ``results/ranking.json``, ``results/finetuned*.json``); the library's defaults now
#: are ``taylor-pf``, ``oba-pf``, ``oba-full-pf`` and ``obs-gm``
SPECS = {"l1": ("l1", {}), "taylor": ("taylor", {"ranking": "group_max"}), "oba": ("oba", {"ranking": "group_max"}),
         "oba-full": ("oba", {"hessian": "full", "ranking": "group_max"}),
         "obs": ("obs", {"ranking": "global"}), "random": ("random", {}),
         # the same criteria under another cross-group ranking (``prune_graph(ranking=...)``)
         "obs-gm": ("obs", {"ranking": "group_max"}), "obs-pf": ("obs", {"ranking": "per_flop"}),
         "oba-pf": ("oba", {"ranking": "per_flop"}), "l1-pf": ("l1", {"ranking": "per_flop"}),
         "oba-full-pf": ("oba", {"hessian": "full", "ranking": "per_flop"}),
         "taylor-pf": ("taylor", {"ranking": "per_flop"})}


def calibration(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, batch: int = 64) -> list:
    """``n`` training images drawn with ``seed`` (a different subset per seed), in batches."""
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return [(x[idx[i:i + batch]], y[idx[i:i + batch]]) for i in range(0, n, batch)]


def pretrained_setup(data, model_name: str, n_calib: int, seed: int, args) -> tuple:
    """Threads, the 1,000 exact test images, the pretrained model, its calibration batches and the
    start of a result record (settings from ``args``, machine, dense accuracy)."""
    from _common import machine

    torch.set_num_threads(args.threads)
    root = data_dir(data)
    test = cifar10_loader(root, "test_lossless1k", batch_size=250)
    model = get_model(model_name, weights=str(root / "weights" / WEIGHTS[model_name])).eval()
    train_x, train_y = load_cifar10_npz(root, "train")
    calib = calibration(train_x, train_y, n_calib, seed)
    res = {"settings": {**vars(args), "date": time.strftime("%Y-%m-%d")}, "machine": machine(),
           "dense": evaluate(model, test), "rows": []}
    return test, model, calib, res


def run_cell(model, spec, ratio, calib, tests, compensate: bool) -> dict:
    crit, extra = SPECS[spec]
    t0 = time.perf_counter()
    out = oba_fx.prune_graph(model, calib[0][0][:1], criterion=crit, data=calib, target_flops=ratio,
                             compensate=compensate, verbose=False, **extra)
    seconds = time.perf_counter() - t0
    r = out.meta["oba"]
    return {"flops": r["flops_after"] / r["flops_before"], "params": r["params_after"] / r["params_before"],
            "bn_recalibrated": r["bn_recalibrated"], "seconds": round(seconds, 1),
            **{name: evaluate(out, dl) for name, dl in tests.items()}}


def summarise(rows: list[dict]) -> dict:
    """(model, ratio, spec, compensated) -> mean / spread of each accuracy over the seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["ratio"], r["spec"], r["compensated"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: (statistics.mean(x[m] for x in rs), max(x[m] for x in rs) - min(x[m] for x in rs))
                    for m in ("exact1k", "jpeg")}
        out[key]["n"] = len(rs)
        out[key]["flops"] = statistics.mean(x["flops"] for x in rs)
    return out


def _jpeg_images(settings: dict) -> str:
    """How many JPEG test images a run used: ``--jpeg`` if given, else all 10,000."""
    return f"{settings['jpeg']:,}" if settings.get("jpeg") else "10,000"


def markdown(res: dict) -> str:
    s = summarise(res["rows"])
    L = [f"# One-shot ranking with compensation ({res['settings']['date']})", "",
         "Exact-1k top-1 %, mean ± half-spread over calibration seeds " + str(res["settings"]["seeds"]) +
         f"; {res['settings']['calib']} calibration images; library defaults (residual streams kept). "
         "`comp`: least-squares compensation (default); `no comp`: BN recalibration instead.", ""]
    for model in res["settings"]["models"]:
        L += [f"## {model} (dense {100 * res['dense'][model]['exact1k']:.1f} % exact-1k, "
              f"{100 * res['dense'][model]['jpeg']:.1f} % on {_jpeg_images(res['settings'])} JPEG test images)", "",
              "| criterion | " + " | ".join(f"r = {r}" for r in res["settings"]["ratios"]) + " |",
              "|---|" + "---:|" * len(res["settings"]["ratios"])]
        for comp in (True, False):
            for spec in res["settings"]["criteria"]:
                cells = []
                for r in res["settings"]["ratios"]:
                    v = s.get((model, r, spec, comp))
                    cells.append("" if v is None else f"{100 * v['exact1k'][0]:.1f} ± {50 * v['exact1k'][1]:.1f}")
                if any(cells):
                    L.append(f"| {spec} ({'comp' if comp else 'no comp'}) | " + " | ".join(cells) + " |")
        L.append("")
        for r in res["settings"]["ratios"]:
            base = s.get((model, r, "l1", True))
            if base is None:
                continue
            for spec in res["settings"]["criteria"]:
                v = s.get((model, r, spec, True))
                if spec == "l1" or v is None:
                    continue
                d = v["exact1k"][0] - base["exact1k"][0]
                noise = (v["exact1k"][1] + base["exact1k"][1]) / 2
                verdict = {"beats": "beats", "loses": "loses to", "within spread": "ties with"}[
                    compare(v["exact1k"][0], v["exact1k"][1], base["exact1k"][0], base["exact1k"][1])]
                L.append(f"- {model}, r = {r}: {spec} {verdict} l1 (both compensated): {100 * d:+.1f} points "
                         f"(noise {100 * noise:.1f})")
        L.append("")
    return "\n".join(L)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(res["rows"])
    models = res["settings"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for spec in res["settings"]["criteria"]:
            for comp, style in ((True, "-o"), (False, ":x")):
                pts = [(v["flops"], 100 * v["exact1k"][0], 50 * v["exact1k"][1])
                       for (m, r, sp, c), v in sorted(s.items()) if m == model and sp == spec and c == comp]
                if pts:
                    x, y, e = zip(*sorted(pts))
                    ax.errorbar(x, y, yerr=e, fmt=style, label=f"{spec}{'' if comp else ' (no comp)'}", capsize=2)
        ax.axhline(100 * res["dense"][model]["exact1k"], color="k", lw=0.8, ls="--", label="dense")
        ax.set(title=f"{model}: one-shot", xlabel="retained FLOPs", ylabel="exact-1k top-1 %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--models", nargs="+", default=["resnet56", "resnet20"], choices=sorted(WEIGHTS))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    p.add_argument("--criteria", nargs="+", default=["l1", "taylor", "oba", "oba-full", "obs"], choices=sorted(SPECS))
    p.add_argument("--uncompensated", nargs="*", default=["l1", "oba"], choices=sorted(SPECS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--jpeg", type=int, default=None,
                   help="first N JPEG test images (default all 10,000; the 2026-12-01/02 results used 2,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="ranking", help="files <out>/<name>.json, .md, .png")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = data_dir(a.data)
    tests = {"exact1k": cifar10_loader(root, "test_lossless1k", batch_size=250),
             "jpeg": cifar10_loader(root, "test", batch_size=500, limit=a.jpeg)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {**vars(a), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__},
           "dense": {}, "rows": []}
    train_x, train_y = load_cifar10_npz(root, "train")
    for model_name in a.models:
        model = get_model(model_name, weights=str(root / "weights" / WEIGHTS[model_name])).eval()
        res["dense"][model_name] = {k: evaluate(model, dl) for k, dl in tests.items()}
        for seed in a.seeds:
            calib = calibration(train_x, train_y, a.calib, seed)
            for ratio in a.ratios:
                for spec in a.criteria:
                    for comp in (True, False):
                        if not comp and spec not in a.uncompensated:
                            continue
                        row = {"model": model_name, "seed": seed, "ratio": ratio, "spec": spec, "compensated": comp}
                        row.update(run_cell(model, spec, ratio, calib, tests, comp))
                        res["rows"].append(row)
                        print(json.dumps(row), flush=True)
                        (out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{a.name}.md").write_text(markdown(res))
    plot(res, out / f"{a.name}.png")


if __name__ == "__main__":
    main()
