"""The network as a dataflow graph of its layers, coloured by coupling group.

Nodes are the graph's inputs and outputs, its parameterised layers (a module with trainable
parameters, or an op that reads a trainable parameter such as ``F.linear(x, in_proj_weight)``),
the ops that merge two different streams (a residual ``add``, a ``cat``, a gate's ``mul``) and
the barriers of the coupling analysis. Every other op is contracted away: an edge ``a -> b``
means ``b`` reads a value computed from ``a`` through such ops. A layer's ``group`` is the
coupling group of its output channels (``None`` when that dimension has no index space);
``fixed`` says those channels can never be removed (pinned).

For pictures, :func:`simplify` fuses a normalisation into the layer before it when nothing else
reads that layer (``conv1+bn1``) and collapses runs of identical sibling blocks into one node
(the first block stays whole), and :func:`oba_fx.pictures.layout.layered_layout` places the result.

Example:
    >>> import torch
    >>> from oba_fx.coupling import analyze
    >>> from oba_fx.tracing import propagate_shapes
    >>> class Res(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(4, 4, 3, padding=1); self.bn = torch.nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return x + self.bn(self.conv(x))
    >>> gm = torch.fx.symbolic_trace(Res()); propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
    >>> gm.meta["oba.coupling"] = analyze(gm)
    >>> G = dataflow_graph(gm)
    >>> list(G.edges)
    [('x', 'conv'), ('x', 'add'), ('conv', 'bn'), ('bn', 'add'), ('add', 'output')]
    >>> G.nodes["bn"]["group"] == G.nodes["conv"]["group"], G.nodes["conv"]["channels"]
    (True, 4)
    >>> G.nodes["add"]["fixed"]    # the sum with the input x: those channels cannot go
    True
    >>> S = simplify(G)
    >>> list(S.edges), S.nodes["conv"]["label"]
    ([('x', 'conv'), ('x', 'add'), ('conv', 'add'), ('add', 'output')], 'conv+bn')
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.fx
import torch.nn as nn

from ..graphs import write_graph
from ..meta import COUPLING, SPACES, TENSOR_META
from ..ops import is_size_value
from ..spaces import Coupling, TensorSpaces
from .common import module_path
from oba_fx.errors import BadInputError

#: module classes fused into the layer before them in pictures
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_OP_NAMES = {operator.add: "add", operator.iadd: "add", operator.mul: "mul", operator.sub: "sub",
             operator.matmul: "matmul", operator.truediv: "div", torch.add: "add", torch.mul: "mul",
             torch.cat: "cat", torch.matmul: "matmul", torch.stack: "stack", torch.einsum: "einsum"}


def _op_name(node: torch.fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    return _OP_NAMES.get(node.target, getattr(node.target, "__name__", str(node.target)))


def _trainable_attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    owner, _, attr = str(node.target).rpartition(".")
    t = getattr(gm.get_submodule(owner) if owner else gm, attr, None)
    return isinstance(t, nn.Parameter) and t.requires_grad


def _is_layer_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return node.op == "call_module" and any(p.requires_grad for p in gm.get_submodule(node.target).parameters())


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if not is_size_value(a) and a.op != "get_attr"]


def _channel_space(node: torch.fx.Node) -> tuple[Any, int | None]:
    """The index space of the channel dimension of ``node``'s value (dim 1 of an image tensor,
    the last dim otherwise) and that dimension's length."""
    tm, spaces = node.meta.get(TENSOR_META), node.meta.get(SPACES)
    shape = getattr(tm, "shape", None)
    if shape is None or len(shape) < 2:
        return None, None
    dim = 1 if len(shape) >= 4 else len(shape) - 1
    space = spaces.at(dim) if isinstance(spaces, TensorSpaces) else None
    return space, int(shape[dim])


def _group(c: Coupling, node: torch.fx.Node) -> dict:
    space, channels = _channel_space(node)
    if space is None:
        return {"group": None, "fixed": True, "channels": channels}
    units = c.units_of(space)
    fixed = not bool(c.prunable[units].any())
    return {"group": int(c.group[units[0]]), "fixed": fixed, "channels": channels}


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node, barriers: set[str], sources: list[frozenset]) -> str | None:
    """What ``node`` is in the dataflow graph, or ``None`` when it is contracted away."""
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.name in barriers:
        return "barrier"
    if _is_layer_module(gm, node) or any(_trainable_attr(gm, a) for a in node.all_input_nodes):
        return "layer"
    if node.op != "get_attr" and len({s for s in sources if s}) >= 2:
        return "merge"
    return None


def _layer_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    attr = next((a for a in node.all_input_nodes if _trainable_attr(gm, a)), None)
    return str(attr.target).rpartition(".")[0] or str(attr.target) if attr is not None else module_path(node)


def _layer_label(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """The module's name, or the parameter's (without a ``weight`` suffix) for an op reading one."""
    if node.op == "call_module":
        return str(node.target)
    attr = next(a for a in node.all_input_nodes if _trainable_attr(gm, a))
    name = str(attr.target)
    for suffix in ("_weight", ".weight"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def _attrs(gm: torch.fx.GraphModule, node: torch.fx.Node, kind: str, c: Coupling, barriers: dict) -> dict:
    shape = getattr(node.meta.get(TENSOR_META), "shape", None)
    base = {"kind": kind, "op": _op_name(node), "shape": list(shape) if shape is not None else [],
            "in_shapes": [list(getattr(a.meta.get(TENSOR_META), "shape", ())) for a in _tensor_inputs(node)]}
    if kind == "layer":
        if node.op == "call_module":
            base["op"] = type(gm.get_submodule(node.target)).__name__
        base.update(path=_layer_name(gm, node), label=_layer_label(gm, node))
    else:
        base.update(path=module_path(node), label=node.name if kind != "merge" else base["op"])
    if kind == "barrier":
        base["reason"] = barriers[node.name]
    base.update(_group(c, node) if kind in ("layer", "merge", "barrier") else
                {"group": None, "fixed": True, "channels": None})
    return base


def dataflow_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The dataflow graph of an analysed GraphModule (``gm.meta["oba.coupling"]`` and the
    ``oba.spaces`` of its nodes, as :func:`oba_fx.passes.pipeline.analyze_model` leaves them).

    Node attributes: ``kind`` (input, output, layer, merge, barrier), ``label``, ``path`` (module),
    ``op``, ``shape``, ``in_shapes``, ``group``, ``fixed``, ``channels`` (and ``reason`` for a barrier).
    """
    c = gm.meta.get(COUPLING)
    if c is None:
        raise BadInputError("dataflow_graph needs an analysed graph (gm.meta['oba.coupling']): "
                         "use oba_fx.passes.pipeline.analyze_model(model, example_inputs)")
    barriers = {b.node: b.reason for b in c.barriers}
    G = nx.DiGraph(name="dataflow")
    src: dict[str, frozenset[str]] = {}
    for node in gm.graph.nodes:
        if is_size_value(node):
            src[node.name] = frozenset()
            continue
        sources = [src.get(a.name, frozenset()) for a in _tensor_inputs(node)]
        kind = _kind(gm, node, set(barriers), sources)
        if kind is None:
            src[node.name] = frozenset().union(*sources)
            continue
        G.add_node(node.name, **_attrs(gm, node, kind, c, barriers))
        for s in frozenset().union(*sources):
            G.add_edge(s, node.name)
        src[node.name] = frozenset([node.name])
    return G


# ------------------------------------------------------------------------------ simplification
def fuse_norms(G: nx.DiGraph) -> nx.DiGraph:
    """Fuse each normalisation layer into the layer before it when it is that layer's only reader
    and reads nothing else; the fused node keeps the first layer's name, label ``a+b``."""
    G = G.copy()
    for n in list(G.nodes):
        d = G.nodes[n]
        preds = list(G.predecessors(n))
        if d["kind"] != "layer" or d["op"] not in _norm_names() or len(preds) != 1:
            continue
        (p,) = preds
        if G.nodes[p]["kind"] != "layer" or G.out_degree(p) != 1:
            continue
        G.nodes[p]["label"] = f"{G.nodes[p]['label']}+{d['path'].rpartition('.')[2]}"
        G.nodes[p].update(group=d["group"], fixed=d["fixed"], channels=d["channels"])
        G.nodes[p]["members"] = G.nodes[p].get("members", [p]) + [n]
        for s in G.successors(n):
            G.add_edge(p, s)
        G.remove_node(n)
    return G


def _norm_names() -> set[str]:
    names = set()
    stack = list(NORMS)
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    return names


def _under(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _signature(G: nx.DiGraph, nodes: list[str], block: str) -> tuple:
    index = {n: i for i, n in enumerate(nodes)}
    rows = tuple((G.nodes[n]["path"][len(block):], G.nodes[n]["kind"], G.nodes[n]["op"], str(G.nodes[n]["shape"]),
                  str(G.nodes[n]["in_shapes"])) for n in nodes)
    edges = tuple(sorted((index.get(a, -1), index[b]) for n in nodes for a, b in G.in_edges(n)))
    return rows, edges


def _children(G: nx.DiGraph, block: str) -> list[str]:
    """Child module prefixes of ``block`` holding nodes, in execution order."""
    out: dict[str, None] = {}
    for n, path in G.nodes(data="path"):
        if G.nodes[n]["kind"] in ("input", "output") or not path:
            continue
        if block == "" or path.startswith(block + "."):
            rest = path[len(block) + 1:] if block else path
            out[(block + "." if block else "") + rest.split(".")[0]] = None
    return [k for k in out if k != block]


def _repeats(G: nx.DiGraph, block: str) -> list[tuple[str, list[str]]]:
    """``(first block, [later identical blocks])`` for each run of identical consecutive children."""
    kids = _children(G, block)
    members = {k: [n for n in G.nodes if _under(G.nodes[n]["path"], k) and G.nodes[n]["kind"] not in ("input", "output")]
               for k in kids}
    sig = {k: _signature(G, members[k], k) for k in kids}
    runs: list[tuple[str, list[str]]] = []
    found: list[tuple[str, list[str]]] = []
    for k in kids:
        if runs and sig[runs[-1][0]] == sig[k] and len(members[k]) > 1:
            runs[-1][1].append(k)
        else:
            runs.append((k, []))
    for first, rest in runs:
        if rest:
            found.append((first, rest))
        else:
            found.extend(_repeats(G, first))
    return found


def _range_label(a: str, b: str) -> str:
    """``layer1.1…8`` for the blocks ``layer1.1`` to ``layer1.8`` (``a`` alone when equal).

    Example:
        >>> _range_label("encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_11")
        'encoder.layers.encoder_layer_1…11'
    """
    if a == b:
        return a
    tail = b.rpartition(".")[2]
    digits = len(tail) - len(tail.rstrip("0123456789"))
    stem_a, stem_b = a.rpartition(".")[2], tail
    if digits and stem_a.rstrip("0123456789") == stem_b.rstrip("0123456789"):
        return f"{a}…{tail[len(tail) - digits:]}"
    return f"{a}…{tail}"


def _contract(G: nx.DiGraph, nodes: list[str], name: str, attrs: dict) -> None:
    preds = {p for n in nodes for p in G.predecessors(n)} - set(nodes)
    succs = {s for n in nodes for s in G.successors(n)} - set(nodes)
    G.remove_nodes_from(nodes)
    G.add_node(name, **attrs)
    G.add_edges_from((p, name) for p in preds)
    G.add_edges_from((name, s) for s in succs)


def collapse_repeats(G: nx.DiGraph) -> nx.DiGraph:
    """Replace every run of identical consecutive sibling blocks but its first by one node
    (``kind="collapsed"``, ``count`` blocks, ``like`` the first); ``G.graph["collapsed"]`` lists them."""
    G = G.copy()
    order = {n: i for i, n in enumerate(G.nodes)}
    notes = []
    for first, rest in _repeats(G, ""):
        nodes = sorted((n for n in G.nodes if any(_under(G.nodes[n]["path"], r) for r in rest)
                        and G.nodes[n]["kind"] not in ("input", "output")), key=order.get)
        last = G.nodes[nodes[-1]]
        name = _range_label(rest[0], rest[-1])
        attrs = {"kind": "collapsed", "label": name, "path": rest[0].rpartition(".")[0] or rest[0],
                 "op": f"{len(rest)}× like {first}",
                 "group": last["group"], "fixed": last["fixed"], "channels": last["channels"],
                 "count": len(rest), "like": first, "members": nodes, "shape": last["shape"], "in_shapes": []}
        _contract(G, nodes, name, attrs)
        notes.append(f"{name}: {len(rest)} block(s) identical to {first}")
    order = {n: i for i, n in enumerate(G.nodes)}
    H = nx.DiGraph()
    H.graph.update(G.graph)
    H.add_nodes_from(sorted(G.nodes(data=True), key=lambda t: _first_member(G, t[0], order)))
    H.add_edges_from(G.edges)
    H.graph["collapsed"] = notes
    return H


def _first_member(G: nx.DiGraph, n: str, order: dict) -> float:
    """Sort key keeping collapsed nodes where their blocks ran (just before their first reader)."""
    if G.nodes[n]["kind"] != "collapsed":
        return order[n]
    succ = [order[s] for s in G.successors(n)]
    return (min(succ) - 0.5) if succ else order[n]


def simplify(G: nx.DiGraph, collapse: bool = True) -> nx.DiGraph:
    """:func:`fuse_norms`, then (``collapse``) :func:`collapse_repeats`."""
    G = fuse_norms(G)
    return collapse_repeats(G) if collapse else G


def write_dataflow(G: nx.DiGraph, path: str | Path) -> Path:
    """Write the dataflow graph as DOT or GraphML (by suffix), list attributes as strings."""
    H = G.copy()
    for _, d in H.nodes(data=True):
        for k, v in list(d.items()):
            if v is None:
                del d[k]
            elif isinstance(v, (list, tuple, np.ndarray)):
                d[k] = str(list(v))
    H.graph = {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in G.graph.items()}
    H.graph.setdefault("rankdir", "LR")
    return write_graph(H, path)
