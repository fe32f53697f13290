"""Mean and spread over calibration seeds of ``finetuned.py`` results, and which criterion beats
the baseline beyond the spread.

Each input is one ``finetuned.py`` result JSON (one model, one seed each). Rows are matched by
(kind, criterion, level); a criterion *beats* (*loses to*) the baseline at a level only when its
mean is above (below) the baseline's by more than the sum of the two half-spreads (spread = max −
min over the seeds), the rule ``ranking.py`` uses too. Anything else is "within spread". Because
the criteria of one seed share its calibration images and augmentation draws, the per-seed
(paired) difference is reported too.

Usage::

    python benchmarks/seed_spread.py benchmarks/results/finetuned56.json \\
        benchmarks/results/finetuned56_seed1.json benchmarks/results/finetuned56_seed2.json \\
        --baseline l1 --out benchmarks/results --name finetuned56_seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import compare, protocol, recipe

METRICS = (("oneshot", "exact1k"), ("tuned", "exact1k"), ("oneshot", "jpeg"), ("tuned", "jpeg"))


def spread(values: list[float]) -> dict:
    """Mean, minimum, maximum and count of ``values``.

    Example:
        >>> spread([0.90, 0.92, 0.91])
        {'mean': 0.91, 'min': 0.9, 'max': 0.92, 'n': 3}
    """
    if not values:
        raise ValueError("spread() needs at least one value")
    return {"mean": round(statistics.fmean(values), 10), "min": min(values), "max": max(values), "n": len(values)}


def by_seed(results: list[dict]) -> dict[tuple, dict[int, dict]]:
    """``{(kind, spec, level): {seed: row}}`` over all results; two results with the same seed and the
    same row are an error (they would be counted twice)."""
    cells: dict[tuple, dict[int, dict]] = {}
    models = {r["settings"]["model"] for r in results}
    if len(models) > 1:
        raise ValueError(f"results mix models {sorted(models)}; pass the JSONs of one model")
    for res in results[1:]:
        a, b = protocol(results[0]["settings"]), protocol(res["settings"])
        diff = {k: (a[k], b[k]) for k in a if k != "seed" and a[k] != b[k]}
        if diff:
            raise ValueError(f"results of seeds {a['seed']} and {b['seed']} differ in more than the seed "
                             f"(first, other): {diff}; compare runs of one protocol")
    for res in results:
        seed = res["settings"]["seed"]
        for row in res["rows"]:
            key = (row["kind"], row["spec"], row["level"])
            if seed in cells.setdefault(key, {}):
                raise ValueError(f"row {key} appears twice for seed {seed}")
            cells[key][seed] = row
    return cells


def verdict(candidate: list[float], baseline: list[float]) -> str:
    """``"beats"`` / ``"loses"`` when the means differ by more than the sum of the two half-spreads
    (:func:`_common.compare`, the rule of ``ranking.py`` too), else ``"within spread"``.

    Example:
        >>> verdict([0.91, 0.92], [0.88, 0.90]), verdict([0.91, 0.92], [0.90, 0.93]), verdict([0.8], [0.9, 0.95])
        ('beats', 'within spread', 'loses')
    """
    a, b = spread(candidate), spread(baseline)
    return compare(a["mean"], a["max"] - a["min"], b["mean"], b["max"] - b["min"])


def summarise(results: list[dict], baseline: str = "l1", min_seeds: int = 1) -> dict:
    """Per cell run with at least ``min_seeds`` seeds: the spread of each metric over seeds, and
    each criterion against ``baseline`` at its level on the seeds both have (unpaired verdict and
    paired difference)."""
    cells = by_seed(results)
    rows = []
    for (kind, spec, level), seeds in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        if len(seeds) < min_seeds:
            continue
        row = {"kind": kind, "spec": spec, "level": level, "seeds": sorted(seeds)}
        for phase, test in METRICS:
            row[f"{phase}_{test}"] = spread([r[phase][test] for r in seeds.values()])
        if kind != "dense":
            base = cells.get((kind, baseline, level))
            shared = sorted(set(seeds) & set(base or {}))
            if spec != baseline and len(shared) >= 2:
                for phase, test in METRICS[:2]:
                    a = [seeds[s][phase][test] for s in shared]
                    b = [base[s][phase][test] for s in shared]
                    row[f"vs_{baseline}_{phase}_{test}"] = {
                        "seeds": shared, "verdict": verdict(a, b),
                        "paired_diff": spread([x - y for x, y in zip(a, b)])}
        rows.append(row)
    return {"model": results[0]["settings"]["model"], "baseline": baseline, "recipe": recipe(results[0]["settings"]),
            "seeds": sorted({r["settings"]["seed"] for r in results}), "rows": rows}


def _pct(s: dict) -> str:
    if s["n"] == 1:
        return f"{100 * s['mean']:.1f} (1 seed)"
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"


def _vs(v: dict | None) -> str:
    if v is None:
        return ""
    d = v["paired_diff"]
    return f"{v['verdict']}; {100 * d['mean']:+.1f} ({100 * d['min']:+.1f} to {100 * d['max']:+.1f})"


def markdown(summary: dict) -> str:
    """The summary as a table: mean (min–max) per metric, and the verdict against the baseline."""
    b = summary["baseline"]
    title = f"# {summary['model']}: mean (min–max) over calibration seeds {summary['seeds']}"
    lines = [title + summary.get("recipe", ""), "",
             "Top-1 % on the exact 1k test images (JPEG: the JPEG-degraded test images, all 10k unless "
             f"`finetuned.py --jpeg` said fewer). *vs {b}*: `beats` / `loses` only when the means differ "
             "by more than the sum of the two half-spreads; then the paired difference per seed, mean "
             "(min to max), in points.", "",
             f"| kind | criterion | level | seeds | one-shot | vs {b} one-shot | fine-tuned | vs {b} fine-tuned | "
             "one-shot JPEG | fine-tuned JPEG |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['kind']} | {r['spec']} | {r['level']} | {len(r['seeds'])} | "
                     f"{_pct(r['oneshot_exact1k'])} | {_vs(r.get(f'vs_{b}_oneshot_exact1k'))} | "
                     f"{_pct(r['tuned_exact1k'])} | {_vs(r.get(f'vs_{b}_tuned_exact1k'))} | "
                     f"{_pct(r['oneshot_jpeg'])} | {_pct(r['tuned_jpeg'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="finetuned.py result JSONs of one model, one seed each")
    p.add_argument("--baseline", default="l1")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="finetuned_seeds")
    p.add_argument("--min-seeds", type=int, default=2, help="leave out cells run with fewer seeds")
    args = p.parse_args(argv)
    summary = summarise([json.loads(Path(f).read_text()) for f in args.results], args.baseline, args.min_seeds)
    summary["inputs"] = [str(f) for f in args.results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{args.name}.md").write_text(markdown(summary))
    sys.stdout.write(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
