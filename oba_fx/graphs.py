"""Dependency graphs as networkx graphs, and writing them as DOT, GraphML, JSON or a picture.

Example:
    >>> import networkx as nx, tempfile, os
    >>> G = nx.Graph(name="coupling"); G.add_node("a", kind="param"); G.add_node("g0", kind="group"); G.add_edge("a", "g0")
    >>> d = tempfile.mkdtemp()
    >>> for ext in ("dot", "graphml", "json"):
    ...     _ = write_graph(G, os.path.join(d, "g." + ext))
    >>> open(os.path.join(d, "g.dot")).read().splitlines()[0]
    'graph "coupling" {'
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np

from .spaces import Coupling
from oba_fx.errors import BadInputError


def coupling_graph(c: Coupling) -> nx.Graph:
    """Groups and the parameter dimensions that belong to them.

    Nodes: ``"group:<k>"`` (``kind="group"``, ``units``, ``prunable`` counts) and
    ``"<param>:<dim>"`` (``kind="param"``, ``owner``, ``dim``, ``size``, ``group``, ``primary``).
    Edges join each parameter dimension to its group (``kind="member"``).
    ``G.graph["barriers"]`` lists the nodes that blocked pruning.
    """
    G = nx.Graph(name="coupling")
    units = np.bincount(c.group, minlength=c.n_groups) if c.n_units else np.zeros(0, int)
    prunable = np.bincount(c.group[c.prunable], minlength=c.n_groups) if c.n_units else np.zeros(0, int)
    used: set[int] = set()
    for (name, dim), s in sorted(c.param_spaces.items()):
        g = int(c.group[c.units_of(s)[0]]) if s.size else -1
        used.add(g)
        node = f"{name}:{dim}"
        G.add_node(node, kind="param", owner=name, dim=dim, size=s.size, group=g, primary=s.id in c.primary)
        G.add_edge(node, f"group:{g}", kind="member")
    for g in sorted(used):
        if g >= 0:
            G.nodes[f"group:{g}"].update(kind="group", group=g, units=int(units[g]), prunable=int(prunable[g]))
    G.graph["barriers"] = [f"{b.node}: {b.reason}" for b in c.barriers]
    return G


def _dot_value(v) -> str:
    return '"' + str(v).replace('"', r"\"") + '"'


def to_dot(G: nx.Graph) -> str:
    """DOT text of ``G`` (no pydot/pygraphviz needed); node/edge attributes become DOT attributes."""
    directed = G.is_directed()
    lines = [f'{"digraph" if directed else "graph"} {_dot_value(G.graph.get("name", "G"))} {{']
    for n, d in G.nodes(data=True):
        attrs = ", ".join(f"{k}={_dot_value(v)}" for k, v in d.items())
        lines.append(f"  {_dot_value(n)} [{attrs}];")
    arrow = "->" if directed else "--"
    for a, b, d in G.edges(data=True):
        attrs = ", ".join(f"{k}={_dot_value(v)}" for k, v in d.items())
        lines.append(f"  {_dot_value(a)} {arrow} {_dot_value(b)} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _plain(G: nx.Graph) -> nx.Graph:
    """A copy whose graph-level attributes are GraphML-safe strings."""
    H = G.copy()
    H.graph = {k: (v if isinstance(v, (str, int, float, bool)) else json.dumps(v)) for k, v in G.graph.items()}
    return H


def draw(G: nx.Graph, path: str | Path) -> None:
    """Draw ``G`` to a PNG or SVG file with matplotlib (colour by ``kind``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = {"group": "#d62728", "param": "#1f77b4", "layer": "#1f77b4", "series": "#7f7f7f",
               "parallel": "#ff7f0e"}
    n = G.number_of_nodes()
    fig, ax = plt.subplots(figsize=(min(4 + n ** 0.5 * 1.5, 40),) * 2)
    pos = nx.spring_layout(G, seed=0) if n else {}
    colors = [palette.get(d.get("kind"), "#2ca02c") for _, d in G.nodes(data=True)]
    ecolors = [palette.get(d.get("kind"), "#bbbbbb") for _, _, d in G.edges(data=True)]
    nx.draw_networkx(G, pos, ax=ax, node_color=colors, edge_color=ecolors, node_size=120,
                     font_size=6, with_labels=n <= 200)
    ax.set_title(str(G.graph.get("name", "")))
    ax.axis("off")
    fig.savefig(str(path), bbox_inches="tight")
    plt.close(fig)


def write_graph(G: nx.Graph, path: str | Path) -> Path:
    """Write ``G``; the suffix picks the format: .dot, .graphml, .json, .png or .svg."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "dot":
        path.write_text(to_dot(G))
    elif fmt == "graphml":
        nx.write_graphml(_plain(G), path)
    elif fmt == "json":
        path.write_text(json.dumps(nx.node_link_data(G, edges="edges"), indent=1, default=str))
    elif fmt in ("png", "svg"):
        draw(G, path)
    else:
        raise BadInputError(f"cannot write a graph as {path.name!r}: use a .dot, .graphml, .json, .png or .svg path")
    return path
