"""A left-to-right layered layout of a DAG, computed here (no external layout engine).

Steps (after Sugiyama et al.): each node's column is its longest path from a source; an edge
spanning several columns gets a dummy point in every column between, so it runs in a lane of its
own instead of through the nodes; nodes and dummies of a column are ordered by the barycentre of
their neighbours' slots (a few sweeps each way, ties by execution order); a node's slot is its
rank in its column, so no two share a place. Long networks wrap into rows of at most
``max_columns`` columns, read like lines of text.

Example:
    >>> import networkx as nx
    >>> G = nx.DiGraph([("x", "a"), ("a", "b"), ("x", "add"), ("b", "add")])
    >>> L = layered_layout(G)
    >>> L.column, L.slot["a"], L.slot["add"]
    ({'x': 0, 'a': 1, 'b': 2, 'add': 3}, 0, 0)
    >>> L.paths[("x", "add")]       # the skip edge runs in lane 1 through columns 1 and 2
    [(0, 0), (1, 1), (2, 1), (3, 0)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
from oba_fx.errors import BadInputError


@dataclass(frozen=True)
class Layout:
    """Where everything goes.

    Attributes:
        column: node -> column (0 = leftmost, over all rows).
        slot: node -> rank within its column (0 = top).
        paths: edge -> its points ``(column, slot)``, source first, one per column it spans.
        columns: number of columns; slots: number of slots of each column.
        per_row: columns per row (rows = ``ceil(columns / per_row)``).
    """

    column: dict
    slot: dict
    paths: dict
    columns: int
    slots: tuple[int, ...]
    per_row: int

    @property
    def rows(self) -> int:
        return math.ceil(self.columns / self.per_row)

    def row_of(self, column: int) -> int:
        return column // self.per_row

    def row_slots(self, row: int) -> int:
        """Slots of the tallest column of ``row``."""
        return max(self.slots[row * self.per_row:(row + 1) * self.per_row])


def longest_path_columns(G: nx.DiGraph) -> dict:
    """Column of each node: the length of the longest path reaching it."""
    col: dict = {}
    for n in nx.topological_sort(G):
        col[n] = max((col[p] + 1 for p in G.predecessors(n)), default=0)
    return col


def _with_dummies(G: nx.DiGraph, col: dict) -> tuple[list[list], dict, dict]:
    """Columns of nodes and dummy points; neighbours of each; every edge's chain of points."""
    order = {n: i for i, n in enumerate(G.nodes)}
    columns: list[list] = [[] for _ in range(max(col.values(), default=-1) + 1)]
    for n in sorted(G.nodes, key=order.get):
        columns[col[n]].append(n)
    up: dict = {n: [] for n in G.nodes}
    down: dict = {n: [] for n in G.nodes}
    chains: dict = {}
    for u, v in G.edges:
        chain = [u] + [("dummy", u, v, c) for c in range(col[u] + 1, col[v])] + [v]
        for c, d in zip(range(col[u] + 1, col[v]), chain[1:-1]):
            columns[c].append(d)
            up[d], down[d] = [], []
        for a, b in zip(chain, chain[1:]):
            down[a].append(b)
            up[b].append(a)
        chains[(u, v)] = chain
    return columns, {"up": up, "down": down}, chains


def _sweep(columns: list[list], nbrs: list[dict], sweeps: int) -> None:
    """Reorder each column by the mean rank of its neighbours in the previous column."""
    for it in range(sweeps):
        forward = it % 2 == 0
        seq = range(1, len(columns)) if forward else range(len(columns) - 2, -1, -1)
        side = nbrs[0] if forward else nbrs[1]
        for c in seq:
            ref = {n: i for i, n in enumerate(columns[c - 1 if forward else c + 1])}
            keep = {n: i for i, n in enumerate(columns[c])}

            def key(n, ref=ref, keep=keep, side=side):
                r = [ref[m] for m in side[n] if m in ref]
                dummy = isinstance(n, tuple)
                return (sum(r) / len(r) if r else keep[n], dummy, keep[n])
            columns[c].sort(key=key)


def layered_layout(G: nx.DiGraph, max_columns: int = 20, sweeps: int = 4) -> Layout:
    """A :class:`Layout` of the DAG ``G`` (node order = tie-break order)."""
    if not nx.is_directed_acyclic_graph(G):
        raise BadInputError("layered_layout needs a directed acyclic graph")
    col = longest_path_columns(G)
    columns, nb, chains = _with_dummies(G, col)
    _sweep(columns, [nb["up"], nb["down"]], sweeps)
    slot = {n: i for c in columns for i, n in enumerate(c)}
    where = {n: (c, i) for c, items in enumerate(columns) for i, n in enumerate(items)}
    paths = {e: [where[p] for p in chain] for e, chain in chains.items()}
    n_cols = len(columns)
    rows = max(1, math.ceil(n_cols / max_columns))
    per_row = max(1, math.ceil(n_cols / rows))
    return Layout({n: col[n] for n in G.nodes}, {n: slot[n] for n in G.nodes}, paths, n_cols,
                  tuple(len(c) for c in columns), per_row)
