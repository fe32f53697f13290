"""Which blocks of the functional Hessian ``H_F`` can be non-zero, read off the graph.

``H_F = Σ_n λ_n f_n''`` (``docs/design.md`` "Which Hessian blocks"): only ops with a second derivative contribute.

* a parameterised layer ``Y = W ⋆ X`` has the cross term ``∂²/∂W∂X``: its block with every
  layer upstream of ``X`` may be non-zero (**series**);
* a product of two activations ``u ⊙ v`` / ``u @ v`` mixes whatever reaches ``u`` with whatever
  reaches ``v`` (**parallel**; a layer reaching both operands gets its own block, a self-loop);
* a smooth op (GELU, sigmoid, softmax, LayerNorm, train-mode BatchNorm, ...) mixes every pair of
  layers that reach its input, itself included (parallel and self-loops);
* a functional layer (``F.batch_norm``/``F.group_norm`` of ``LAYER``/``SMOOTH_LAYER`` class) is
  linear in the weights it reads with ``get_attr``: like the module, a series block for them;
* attention ``softmax(q kᵀ + mask) v`` is smooth in (q, k, mask) and linear in v: every pair
  reaching q, k or the mask, and each of those with every layer reaching v (**parallel**), but
  no pair reaching only v;
* piecewise-linear and linear ops (ReLU, max-pool, add, reshape, cat) contribute nothing;
* an op without a rule in the op table is assumed to mix everything it reads (never a false zero).

Nodes of the result are module names of parameterised layers (a parameter read directly with
``get_attr``, e.g. a layer-scale vector, counts as a layer named after its module).

Example:
    >>> import torch, torch.fx
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> G = block_structure(torch.fx.symbolic_trace(m))
    >>> sorted(G.edges(data="kind")), list(nx.selfloop_edges(G))
    ([('0', '2', 'series')], [])
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from .ops import Curvature, is_size_value, rule_for_node


def _layer_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    if node.op == "get_attr":
        t = getattr(gm.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else gm,
                    node.target.rpartition(".")[2], None)
        if isinstance(t, nn.Parameter) and t.requires_grad:
            return node.target.rpartition(".")[0] or node.target
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if any(p.requires_grad for p in m.parameters(recurse=True)):
            return node.target
    return None


def _attention_scores_inputs(node: torch.fx.Node) -> list[Any]:
    """Query, key and attention mask of a ``scaled_dot_product_attention`` call."""
    names = ("query", "key", "value", "attn_mask")
    vals = list(node.args) + [None] * (4 - len(node.args))
    vals = [vals[i] if vals[i] is not None else node.kwargs.get(n) for i, n in enumerate(names)]
    return [vals[0], vals[1], vals[3]]


class _Blocks:
    """The block graph under construction, and which layers reach each node's value.

    Edges are collected in plain sets (``kinds[a][b]``, symmetric) and the networkx graph is
    built once at the end (:meth:`graph`): a smooth op deep in a network mixes every pair of
    the hundreds of layers upstream, and most of those pairs are already there.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.up: dict[str, frozenset[str]] = {}
        self.layers: list[str] = []
        self.kinds: dict[str, dict[str, set[str]]] = {}
        self.parallel: dict[str, set[str]] = {}
        self.order: list[tuple[str, str]] = []

    def ups(self, a: Any) -> frozenset[str]:
        return self.up.get(a.name, frozenset()) if isinstance(a, torch.fx.Node) else frozenset()

    def add_layer(self, layer: str) -> None:
        if layer not in self.kinds:
            self.layers.append(layer)
            self.kinds[layer] = {}
            self.parallel[layer] = set()

    def add(self, a: str, b: str, kind: str) -> None:
        self.add_layer(a)
        self.add_layer(b)
        ka = self.kinds[a]
        if b not in ka:
            ka[b] = self.kinds[b][a] = set()
            self.order.append((a, b))
        ka[b].add(kind)
        if kind == "parallel":
            self.parallel[a].add(b)
            self.parallel[b].add(a)

    def mix(self, sets: list[frozenset[str]], cross_only: bool) -> None:
        """Parallel pairs between operands (``cross_only``) or among everything that reaches the op."""
        if cross_only:
            for i in range(len(sets)):
                for j in range(i + 1, len(sets)):
                    for a in sets[i]:
                        for b in sets[j] - self.parallel.get(a, frozenset()):
                            self.add(a, b, "parallel")
        else:
            allv = frozenset().union(*sets) if sets else frozenset()
            for a in sorted(allv):  # the pairs (a, b >= a) not there yet
                for b in sorted(allv - self.parallel.get(a, frozenset())):
                    self.add(a, b, "parallel")

    def graph(self) -> nx.Graph:
        """The networkx graph: layers in order of first use, edges in order of first reason."""
        G = nx.Graph(name="hessian_blocks")
        for layer in self.layers:
            G.add_node(layer, kind="layer")
        for a, b in self.order:
            kinds = sorted(self.kinds[a][b])
            G.add_edge(a, b, kind="series" if "series" in kinds else kinds[0], kinds=kinds)
        return G

    def attention(self, node: torch.fx.Node) -> None:
        """``softmax(q kᵀ + mask) v``: smooth in (q, k, mask), linear in v."""
        qk = frozenset().union(*(self.ups(a) for a in _attention_scores_inputs(node)))
        v = self.ups(node.args[2]) if len(node.args) > 2 else self.ups(node.kwargs.get("value"))
        self.mix([qk], cross_only=False)
        self.mix([qk, v], cross_only=True)
        for a in qk & v:
            self.add(a, a, "parallel")

    def bilinear(self, node: torch.fx.Node, ins: list[torch.fx.Node], quotient: bool) -> None:
        """A product (or quotient) of two operands."""
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        operands = tensors[:2] if len(tensors) >= 2 else ins
        operand_sets = [self.ups(a) for a in operands]
        params = [_layer_of(self.gm, a) for a in operands if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        if len(operands) == 2 and any(params):  # parameter * activation: that parameter's series term
            p_layer = next(p for p in params if p)
            for a in frozenset().union(*operand_sets) - {p_layer}:
                self.add(p_layer, a, "series")
            operand_sets = [s - {p_layer} for s in operand_sets]
        self.mix(operand_sets, cross_only=True)
        if len(operand_sets) == 2:  # a layer reaching both operands (y * gate(y)) gets its own block
            for a in operand_sets[0] & operand_sets[1]:
                self.add(a, a, "parallel")
        if quotient and len(node.args) >= 2:  # 1/v is smooth in v
            self.mix([self.ups(node.args[1])], cross_only=False)

    def functional_layer(self, node: torch.fx.Node, smooth: bool) -> None:
        """A layer written as a function of its input (the first operand) and its weights (the
        other operands: ``F.batch_norm(x, self.running_mean, ..., self.weight, self.bias)``).

        A weight read with ``get_attr`` enters linearly: its layer's block with every layer
        reaching the input may be non-zero (**series**), and not its own block. A computed
        operand is bilinear with the input (or, ``smooth``, mixes with it); with batch
        statistics (``smooth``) every pair reaching the input is mixed too."""
        x = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else node.all_input_nodes[0]
        rest = [a for a in node.all_input_nodes if a is not x]
        computed = [self.ups(a) for a in rest if a.op != "get_attr"]
        self.mix([self.ups(x)] + computed, cross_only=not smooth)
        for a in rest:
            layer = _layer_of(self.gm, a) if a.op == "get_attr" else None
            if layer is not None:
                for b in self.ups(x):
                    self.add(layer, b, "series")

    def visit(self, node: torch.fx.Node) -> None:
        gm = self.gm
        layer = _layer_of(gm, node)
        if layer is not None:
            self.add_layer(layer)
        ins = list(node.all_input_nodes) if node.op != "get_attr" else []
        in_sets = [self.ups(a) for a in ins]
        reach = frozenset().union(*in_sets) if in_sets else frozenset()
        if is_size_value(node):  # x.shape, x.size(1), ...: integers, no derivative
            self.up[node.name] = frozenset()
            return
        rule = rule_for_node(gm, node) if node.op != "get_attr" else None
        if rule is not None:
            curv = rule.curvature_for(gm, node)
        else:
            curv = Curvature.NONE if node.op == "get_attr" else Curvature.UNKNOWN
        if curv in (Curvature.LAYER, Curvature.SMOOTH_LAYER) and node.op != "call_module" and ins:
            self.functional_layer(node, curv == Curvature.SMOOTH_LAYER)
        elif curv in (Curvature.SMOOTH, Curvature.UNKNOWN, Curvature.SMOOTH_LAYER):
            self.mix(in_sets, cross_only=False)
        elif curv == Curvature.ATTENTION:
            self.attention(node)
        elif curv in (Curvature.BILINEAR, Curvature.QUOTIENT):
            self.bilinear(node, ins, curv == Curvature.QUOTIENT)
        if layer is not None and node.op == "call_module":
            for a in reach:  # the layer's (W, X) cross term
                self.add(layer, a, "series")
            if curv == Curvature.UNKNOWN:  # a parameterised op we do not understand: assume it mixes
                for a in reach | {layer}:
                    self.add(layer, a, "parallel")
                self.add(layer, layer, "parallel")
            self.up[node.name] = reach | {layer}
        elif layer is not None:  # a parameter read with get_attr
            self.up[node.name] = frozenset([layer])
        else:
            self.up[node.name] = reach


def block_structure(gm: torch.fx.GraphModule) -> nx.Graph:
    """The block structure of ``H_F`` as an undirected graph.

    Edges carry ``kind`` ("series" when one layer is upstream of the other's input, else
    "parallel") and ``kinds`` (every reason found). A self-loop marks a layer whose own block
    may be non-zero.
    """
    blocks = _Blocks(gm)
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            blocks.visit(node)
    return blocks.graph()
