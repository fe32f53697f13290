"""What a pruning run removed: per layer, output channels (neurons, heads) before → after, and
the FLOPs kept per stage, from the report ``compiled.meta["oba"]``.

Example:
    >>> r = {"layers": {"conv": ["conv.weight", "channels", 16, 9], "fc": ["fc.weight", "neurons", 10, 10]},
    ...      "heads": {}, "flops_by_module": {"conv": [100, 60], "fc": [10, 10]}}
    >>> removed_rows(r)
    [('conv', 'channels', 16, 9), ('fc', 'neurons', 10, 10)]
    >>> stage_flops(r)
    [('conv', 100, 60), ('fc', 10, 10)]
    >>> stage_flops(r, small=0.5)
    [('conv', 100, 60), ('(1 small)', 10, 10)]
"""

from __future__ import annotations

from pathlib import Path

from .common import FONT, pyplot, save_figure, stage_map
from oba_fx.errors import BadInputError


def removed_rows(report: dict) -> list[tuple[str, str, int, int]]:
    """``(layer, unit, before, after)`` per layer in model order; attention heads as
    ``"<module> (heads)"`` right after that module's layers."""
    if "layers" not in report:
        raise BadInputError("the report has no per-layer sizes ('layers'): it was made by an older oba_fx; prune again")
    rows = [(name, unit, before, after) for name, (_, unit, before, after) in report["layers"].items()]
    for key, (before, after) in report.get("heads", {}).items():
        at = max((i for i, r in enumerate(rows) if r[0] == key or r[0].startswith(key + ".")), default=len(rows) - 1)
        rows.insert(at + 1, (f"{key} (heads)", "heads", before, after))
    return rows


def stage_flops(report: dict, small: float = 0.005) -> list[tuple[str, int, int]]:
    """``(stage, FLOPs before, after)`` in model order (stages: :func:`oba_fx.pictures.common.stage_map`);
    stages under ``small`` of the total are summed into one last row ``"(n small)"``."""
    per = {k or "(root)": v for k, v in report.get("flops_by_module", {}).items() if v[0] or v[1]}
    stages = stage_map(per)
    out: dict[str, list[int]] = {}
    for k, (before, after) in per.items():
        acc = out.setdefault(stages[k], [0, 0])
        acc[0] += before
        acc[1] += after
    total = sum(a for a, _ in out.values()) or 1
    big = [(k, a, b) for k, (a, b) in out.items() if a >= small * total]
    rest = [(a, b) for k, (a, b) in out.items() if a < small * total]
    if rest:
        big.append((f"({len(rest)} small)", sum(a for a, _ in rest), sum(b for _, b in rest)))
    return big


def _layers_panel(ax, rows) -> None:
    y = range(len(rows))
    ax.barh(y, [1.0] * len(rows), color="#e6e6e6", height=0.8)
    colours = {"channels": "#1f77b4", "neurons": "#2ca02c", "heads": "#d62728"}
    ax.barh(y, [a / b if b else 1.0 for _, _, b, a in rows], color=[colours[u] for _, u, _, _ in rows], height=0.8)
    for i, (_, _, b, a) in enumerate(rows):
        ax.text(1.01, i, f"{b} → {a}", va="center", fontsize=FONT - 1)
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=FONT)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1.25)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0", "25 %", "50 %", "75 %", "100 %"], fontsize=FONT)
    ax.set_title("kept per layer (bar: fraction; text: before → after)\n"
                 "blue: channels, green: neurons, red: attention heads", fontsize=FONT + 1)
    ax.spines[["top", "right"]].set_visible(False)


def _stages_panel(ax, stages) -> None:
    y = range(len(stages))
    scale = max((b for _, b, _ in stages), default=1) or 1
    ax.barh(y, [b / scale for _, b, _ in stages], color="#e6e6e6", height=0.8, label="before")
    ax.barh(y, [a / scale for _, _, a in stages], color="#ff7f0e", height=0.8, label="after")
    for i, (_, b, a) in enumerate(stages):
        ax.text(b / scale + 0.01, i, f"{100 * a / b:.0f} % of {b / 1e6:.1f} M" if b else "—", va="center",
                fontsize=FONT - 1)
    ax.set_yticks(list(y), [s[0] for s in stages], fontsize=FONT)
    ax.set_ylim(len(stages) - 0.5, -0.5)
    ax.set_xlim(0, 1.45)
    ax.set_xticks([])
    ax.set_title("FLOPs per stage: kept (orange) of before (grey)", fontsize=FONT + 1)
    ax.spines[["top", "right", "bottom"]].set_visible(False)


def draw_removed(report: dict, path: str | Path, title: str = "what was removed") -> Path:
    """Draw :func:`removed_rows` and :func:`stage_flops` side by side; returns the path written."""
    plt = pyplot()
    rows, stages = removed_rows(report), stage_flops(report)
    label_w = 0.07 * max((len(r[0]) for r in rows), default=4) + 0.3
    stage_w = 0.07 * max((len(s[0]) for s in stages), default=4) + 0.3
    height = max(len(rows) * 0.17, len(stages) * 0.3, 2.0) + 1.3
    width = label_w + 4.2 + stage_w + 3.6
    fig = plt.figure(figsize=(width, height))
    left = fig.add_axes([label_w / width, 0.5 / height, 4.0 / width, (height - 1.3) / height])
    right = fig.add_axes([(label_w + 4.2 + stage_w) / width, 1 - (0.8 + len(stages) * 0.3) / height,
                          3.4 / width, len(stages) * 0.3 / height])
    _layers_panel(left, rows)
    _stages_panel(right, stages)
    f0, f1 = report.get("flops_before"), report.get("flops_after")
    note = f" — FLOPs {f0 / 1e6:.1f} M → {f1 / 1e6:.1f} M ({100 * f1 / f0:.1f} %)" if f0 else ""
    fig.text(0.01, 1 - 0.1 / height, title + note, fontsize=FONT + 4, weight="bold", va="top")
    return save_figure(fig, path)
