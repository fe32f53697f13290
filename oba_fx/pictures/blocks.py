"""The Hessian block matrix: layers × layers in execution order, each cell the kind of the
``H_F`` block (``docs/design.md`` "Which Hessian blocks").

Cell codes: 0 zero (an exact zero block), 1 self (a layer's own block), 2 series (one layer is
upstream of the other's input), 3 parallel (mixed by a product, smooth op or attention). Past
``max_layers`` layers the matrix is aggregated over consecutive layers sharing a module prefix;
an aggregated cell holds the strongest kind of any pair in it (series > parallel > self > zero).

Example:
    >>> import torch, torch.fx
    >>> from oba_fx.hessian_blocks import block_structure
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> bm = block_matrix(block_structure(torch.fx.symbolic_trace(m)))
    >>> bm.labels, bm.codes.tolist()
    (('0', '2'), [[1, 2], [2, 0]])
    >>> block_rows(bm)[:2]
    [('0', '0', 'self'), ('0', '2', 'series')]
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import networkx as nx
import numpy as np

from .common import FONT, prefix, pyplot, save_figure, stage_map
from oba_fx.errors import BadInputError

#: cell code -> kind
KINDS = ("zero", "self", "series", "parallel")
CODE = {k: i for i, k in enumerate(KINDS)}
#: colours of the kinds (zero, self, series, parallel)
COLORS = ("#f4f4f4", "#2b2b2b", "#1f77b4", "#ff7f0e")
_STRENGTH = np.array([0, 1, 3, 2])  # series > parallel > self > zero


@dataclass(frozen=True)
class BlockMatrix:
    """The block matrix of one network.

    Attributes:
        labels: row/column names in execution order (layers, or module prefixes when aggregated).
        codes: ``int8[n, n]`` cell codes (see :data:`KINDS`), symmetric.
        stages: ``(stage name, first index, end index)`` runs of consecutive rows.
        layers: number of layers before aggregation.
        aggregated_depth: the prefix depth used for aggregation (``None`` when not aggregated).
    """

    labels: tuple[str, ...]
    codes: np.ndarray
    stages: tuple[tuple[str, int, int], ...]
    layers: int
    aggregated_depth: int | None = None

    def kind(self, a: str, b: str) -> str:
        """The kind of the cell of rows ``a`` and ``b``."""
        i, j = self.labels.index(a), self.labels.index(b)
        return KINDS[int(self.codes[i, j])]


def layer_codes(H: nx.Graph, order: Sequence[str]) -> np.ndarray:
    """Cell codes of every layer pair of ``H`` (a :func:`oba_fx.hessian_structure` graph) in ``order``."""
    index = {n: i for i, n in enumerate(order)}
    codes = np.zeros((len(order), len(order)), dtype=np.int8)
    for a, b, kind in H.edges(data="kind"):
        i, j = index[a], index[b]
        codes[i, j] = codes[j, i] = CODE["self"] if a == b else CODE[kind]
    return codes


def _runs(labels: Sequence[str]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for i, name in enumerate(labels):
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1], i + 1)
        else:
            out.append((name, i, i + 1))
    return out


def _aggregate(codes: np.ndarray, runs: list[tuple[str, int, int]]) -> np.ndarray:
    """The strongest kind of every block of rows × columns given by ``runs``."""
    rank = _STRENGTH[codes]
    inverse = np.argsort(_STRENGTH)
    out = np.zeros((len(runs), len(runs)), dtype=np.int8)
    for i, (_, a0, a1) in enumerate(runs):
        for j, (_, b0, b1) in enumerate(runs):
            out[i, j] = inverse[rank[a0:a1, b0:b1].max()]
    return out


def block_matrix(H: nx.Graph, order: Sequence[str] | None = None, max_layers: int = 200) -> BlockMatrix:
    """The :class:`BlockMatrix` of a Hessian block graph.

    Args:
        H: the graph of :func:`oba_fx.hessian_structure` (or ``gm.meta["oba.hessian_structure"]``).
        order: layer names in execution order (default: ``H``'s node order, which is the order
            the analysis visited them).
        max_layers: above this many layers, aggregate consecutive layers per module prefix
            (the deepest prefix depth giving at most this many rows).
    """
    order = list(order) if order is not None else list(H.nodes)
    missing = set(H.nodes) - set(order)
    if missing:
        raise BadInputError(f"order lacks layers of the Hessian structure: {sorted(missing)[:5]}")
    codes = layer_codes(H, order)
    labels, depth = list(order), None
    if len(order) > max_layers:
        for depth in range(max(n.count(".") for n in order), 0, -1):
            runs = _runs([prefix(n, depth) for n in order])
            if len(runs) <= max_layers:
                break
        codes = _aggregate(codes, runs)
        labels = [r[0] for r in runs]
    stages = stage_map(labels)
    return BlockMatrix(tuple(labels), codes, tuple(_runs([stages[n] for n in labels])), len(order), depth)


def block_rows(bm: BlockMatrix) -> list[tuple[str, str, str]]:
    """``(row, column, kind)`` for every non-zero cell on or above the diagonal."""
    i, j = np.nonzero(np.triu(bm.codes))
    return [(bm.labels[a], bm.labels[b], KINDS[int(bm.codes[a, b])]) for a, b in zip(i, j)]


def write_block_csv(bm: BlockMatrix, path: str | Path) -> Path:
    """Write :func:`block_rows` as CSV with the header ``row,column,kind``."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "column", "kind"])
        w.writerows(block_rows(bm))
    return path


def _note(bm: BlockMatrix) -> str:
    counts = np.bincount(np.triu(bm.codes)[np.triu_indices(len(bm.labels))], minlength=4)
    text = ", ".join(f"{KINDS[k]} {counts[k]}" for k in (1, 2, 3)) + f", zero {counts[0]} (cells on/above the diagonal)"
    if bm.aggregated_depth is not None:
        text += (f"\naggregated: {bm.layers} layers shown as {len(bm.labels)} module prefixes (depth "
                 f"{bm.aggregated_depth}); a cell shows the strongest kind in it: series > parallel > self > zero")
    return text


def draw_block_matrix(bm: BlockMatrix, path: str | Path, title: str = "Hessian block structure") -> Path:
    """Draw ``bm`` as a coloured matrix with stage separators; returns the path written."""
    return save_figure(block_matrix_figure(bm, title), path)


def block_matrix_figure(bm: BlockMatrix, title: str = "Hessian block structure"):
    """The matplotlib figure of :func:`draw_block_matrix`; its first axes' image holds ``bm.codes``."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(bm.labels)
    cell = 0.125 if n > 40 else 0.25
    side = max(4.0, n * cell)
    label_w = 0.065 * max(len(s) for s in bm.labels) + 0.3
    fig = plt.figure(figsize=(side + label_w + 0.6, side + label_w + 1.4))
    W, Hh = fig.get_size_inches()
    ax = fig.add_axes([(label_w + 0.1) / W, 0.9 / Hh, side / W, side / Hh])
    ax.imshow(bm.codes, cmap=ListedColormap(COLORS), vmin=-0.5, vmax=3.5, interpolation="nearest")
    size = min(FONT, max(6.0, cell * 72 * 0.9))
    ax.set_xticks(range(n), bm.labels, rotation=90, fontsize=size)
    ax.set_yticks(range(n), bm.labels, fontsize=size)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for _, a, b in bm.stages[1:]:
        ax.axhline(a - 0.5, color="k", lw=0.8)
        ax.axvline(a - 0.5, color="k", lw=0.8)
    handles = [Patch(facecolor=c, edgecolor="#999", label=k) for k, c in zip(KINDS, COLORS)]
    fig.legend(handles=handles, loc="lower left", ncol=4, fontsize=FONT + 1, frameon=False,
               bbox_to_anchor=(0.02, 0.0))
    fig.text(0.02, 1 - 0.15 / Hh, title, fontsize=FONT + 4, va="top", weight="bold")
    fig.text(0.02, 0.42 / Hh, _note(bm), fontsize=FONT, va="bottom")
    return fig
