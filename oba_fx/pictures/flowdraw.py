"""Drawing the dataflow graph (:mod:`oba_fx.pictures.dataflow`) with its layered layout.

A node is a box in its column and slot (a circle for a merge op); colour is the coupling group of
its output channels, grey when those channels are pinned, a red border marks a barrier, a hatched
box a run of collapsed blocks. Names are written relative to their stage, whose name heads its
columns. Rows wrap like text; an edge leaving a row continues at the start of the next one.

Example:
    >>> import os, tempfile, networkx as nx
    >>> G = nx.DiGraph()
    >>> G.add_node("x", kind="input", label="x", path="", op="x", group=None, fixed=True, channels=None)
    >>> G.add_node("fc", kind="layer", label="fc", path="fc", op="Linear", group=0, fixed=False, channels=4)
    >>> G.add_edge("x", "fc")
    >>> path = draw_dataflow(G, os.path.join(tempfile.mkdtemp(), "flow.png"))
    >>> path.stat().st_size > 1000
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from .common import FONT, pyplot, relative, save_figure, stage_map
from .layout import Layout, layered_layout

PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fdbf6f", "#cab2d6", "#e5c494",
           "#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3")
FIXED = "#d9d9d9"
SYMBOL = {"add": "+", "sub": "−", "mul": "×", "matmul": "@", "div": "÷"}
SLOT_H = 0.62
HEADER = 0.34
ROW_GAP = 0.3
MARGIN = 0.35
#: widest picture (inches) before rows wrap
MAX_WIDTH = 24.0


@dataclass(frozen=True)
class Geometry:
    """Inches: column width, box size, where each row starts."""

    layout: Layout
    col_w: float
    box_w: float
    box_h: float
    row_top: tuple[float, ...]

    def xy(self, column: int, slot: int) -> tuple[float, float]:
        row = self.layout.row_of(column)
        x = MARGIN + (column % self.layout.per_row + 0.5) * self.col_w
        return x, self.row_top[row] + HEADER + (slot + 0.5) * SLOT_H

    def row_edges(self) -> tuple[float, float]:
        return MARGIN, MARGIN + self.layout.per_row * self.col_w


def _texts(G: nx.DiGraph) -> dict:
    """Two label lines per node, names relative to their stage."""
    stages = stage_map(d["path"] for _, d in G.nodes(data=True) if d["path"])
    out = {}
    for n, d in G.nodes(data=True):
        name = relative(d["label"], stages.get(d["path"], ""))
        if d["kind"] in ("input", "output"):
            out[n] = (d["label"], "")
        elif d["kind"] == "merge":
            out[n] = (SYMBOL.get(d["op"], d["op"]), "")
        elif d["kind"] == "collapsed":
            out[n] = (name, f"{d['count']}× like {d['like'].rpartition('.')[2]}")
        else:
            ch = f" {d['channels']}" if d.get("channels") else ""
            grp = f" g{d['group']}" if d.get("group") is not None else ""
            out[n] = (name, f"{d['op']}{ch}{grp}" if d["kind"] != "barrier" else "barrier")
    return out


def _column_width(texts: dict) -> float:
    longest = max((len(t) for pair in texts.values() for t in pair), default=4)
    return min(max(0.068 * longest + 0.4, 1.1), 3.0)


def _geometry(L: Layout, texts: dict) -> Geometry:
    col_w = _column_width(texts)
    tops, y = [], 0.75
    for r in range(L.rows):
        tops.append(y)
        y += HEADER + L.row_slots(r) * SLOT_H + ROW_GAP
    return Geometry(L, col_w, col_w - 0.28, SLOT_H * 0.7, tuple(tops))


def _colour(d: dict, colours: dict) -> str:
    if d["kind"] in ("input", "output"):
        return "white"
    if d.get("fixed") or d.get("group") is None:
        return FIXED
    return colours.setdefault(d["group"], PALETTE[len(colours) % len(PALETTE)])


def _draw_node(ax, g: Geometry, n, d: dict, text: tuple, colour: str) -> None:
    from matplotlib.patches import Circle, FancyBboxPatch

    x, y = g.xy(g.layout.column[n], g.layout.slot[n])
    if d["kind"] == "merge":
        ax.add_patch(Circle((x, y), 0.17, facecolor=colour, edgecolor="#333", lw=0.8, zorder=3))
        ax.text(x, y, text[0], ha="center", va="center", fontsize=FONT + 1, zorder=4)
        return
    style = {"barrier": dict(edgecolor="#d62728", lw=2.4), "collapsed": dict(edgecolor="#333", lw=0.8, hatch="///"),
             "input": dict(edgecolor="#333", lw=0.8, linestyle="--"),
             "output": dict(edgecolor="#333", lw=0.8, linestyle="--")}.get(d["kind"], dict(edgecolor="#333", lw=0.8))
    ax.add_patch(FancyBboxPatch((x - g.box_w / 2, y - g.box_h / 2), g.box_w, g.box_h, facecolor=colour,
                                boxstyle="round,pad=0,rounding_size=0.06", zorder=3, **style))
    if text[1]:
        ax.text(x, y - 0.085, text[0], ha="center", va="center", fontsize=FONT, zorder=4,
                bbox=dict(facecolor=colour, edgecolor="none", pad=0.3) if d["kind"] == "collapsed" else None)
        ax.text(x, y + 0.1, text[1], ha="center", va="center", fontsize=FONT - 1, color="#333", zorder=4,
                bbox=dict(facecolor=colour, edgecolor="none", pad=0.3) if d["kind"] == "collapsed" else None)
    else:
        ax.text(x, y, text[0], ha="center", va="center", fontsize=FONT, zorder=4)


def _half_width(g: Geometry, G: nx.DiGraph, n) -> float:
    return 0.17 if G.nodes[n]["kind"] == "merge" else g.box_w / 2


def _draw_edge(ax, g: Geometry, G: nx.DiGraph, edge, points: list) -> None:
    """A polyline through the edge's points; a change of row goes out right and in left."""
    u, v = edge
    xy = [g.xy(c, s) for c, s in points]
    seq = [(xy[0][0] + _half_width(g, G, u), xy[0][1])]
    left, right = g.row_edges()
    for k in range(1, len(points)):
        (x, y), (c0, c1) = xy[k], (points[k - 1][0], points[k][0])
        if g.layout.row_of(c0) != g.layout.row_of(c1):
            seq.append((right, seq[-1][1]))
            ax.plot(*zip(*seq), color="#555", lw=0.9, zorder=1)
            ax.annotate("", (right + 0.12, seq[-1][1]), (right, seq[-1][1]), arrowprops=dict(arrowstyle="-|>", color="#555", lw=0.9))
            seq = [(left - 0.1, y)]
        if k < len(points) - 1:
            seq += [(x - g.box_w / 2, y), (x + g.box_w / 2, y)]
    end = (xy[-1][0] - _half_width(g, G, v), xy[-1][1])
    ax.plot(*zip(*seq), color="#555", lw=0.9, zorder=1)
    ax.annotate("", end, seq[-1], arrowprops=dict(arrowstyle="-|>", color="#555", lw=0.9, shrinkA=0, shrinkB=0), zorder=2)


def _draw_stages(ax, g: Geometry, G: nx.DiGraph) -> None:
    """Each stage's name over its columns, with a bracket line, per row."""
    stages = stage_map(d["path"] for _, d in G.nodes(data=True) if d["path"])
    spans: dict = {}
    for n, d in G.nodes(data=True):
        if d["path"] in stages:
            c = g.layout.column[n]
            key = (stages[d["path"]], g.layout.row_of(c))
            lo, hi = spans.get(key, (c, c))
            spans[key] = (min(lo, c), max(hi, c))
    for (stage, row), (lo, hi) in spans.items():
        x0, _ = g.xy(lo, 0)
        x1, _ = g.xy(hi, 0)
        y = g.row_top[row] + 0.12
        room = int((x1 - x0 + g.box_w) / 0.068)
        ax.plot([x0 - g.box_w / 2, x1 + g.box_w / 2], [y + 0.12] * 2, color="#888", lw=1.2)
        ax.text(x0 - g.box_w / 2, y, stage if len(stage) <= room else stage[: max(room - 1, 1)] + "…",
                fontsize=FONT, va="center", ha="left", color="#444", weight="bold")


def _legend(fig, G: nx.DiGraph, colours: dict, H: float) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="#333", label=f"g{k}") for k, c in list(colours.items())[:12]]
    handles += [Patch(facecolor=FIXED, edgecolor="#333", label="channels pinned"),
                Patch(facecolor="white", edgecolor="#d62728", lw=2, label="barrier"),
                Patch(facecolor="white", edgecolor="#333", hatch="///", label="collapsed blocks")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 1 - 0.3 / H), ncol=min(len(handles), 8),
               fontsize=FONT, frameon=False, handlelength=1.2, columnspacing=1.0)


def draw_dataflow(G: nx.DiGraph, path: str | Path, title: str = "dataflow", max_columns: int = 20) -> Path:
    """Draw a (simplified) dataflow graph left to right; returns the path written."""
    plt = pyplot()
    texts = _texts(G)
    per_row = max(6, min(max_columns, int(MAX_WIDTH / _column_width(texts))))
    L = layered_layout(G, max_columns=per_row)
    g = _geometry(L, texts)
    notes = ["colour: coupling group (gN) of a layer's output channels; grey: channels that cannot be removed"]
    notes += ["collapsed: " + s for s in G.graph.get("collapsed", [])]
    W = 2 * MARGIN + L.per_row * g.col_w
    H = g.row_top[-1] + HEADER + L.row_slots(L.rows - 1) * SLOT_H + 0.2 + 0.17 * len(notes) + 0.2
    fig = plt.figure(figsize=(max(W, 8.0), H))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, max(W, 8.0))
    ax.set_ylim(H, 0)
    ax.axis("off")
    fig.text(0.01, 1 - 0.08 / H, title, fontsize=FONT + 4, weight="bold", va="top")
    colours: dict = {}
    for n, d in G.nodes(data=True):
        _draw_node(ax, g, n, d, texts[n], _colour(d, colours))
    for e, pts in L.paths.items():
        _draw_edge(ax, g, G, e, pts)
    _draw_stages(ax, g, G)
    _legend(fig, G, colours, H)
    y = H - 0.2 - 0.17 * len(notes)
    for k, line in enumerate(notes):
        ax.text(MARGIN, y + 0.17 * (k + 0.5), line, fontsize=FONT, va="center")
    return save_figure(fig, path)
