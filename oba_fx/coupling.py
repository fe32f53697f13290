"""Element-level channel coupling of an FX graph.

Every prunable dimension of a tensor (a node's value) or of a parameter/buffer is an index
*space*; every index of a space is an *element* with a global id. Op rules (``oba_fx.ops``)
declare which elements must be removed together (a union-find edge) and which can never be
removed (pinned). The connected components of elements are *units*: the smallest sets of
channels that can be removed while the network stays well formed (an output channel of a
conv with its bias, its BatchNorm entries and the matching input columns of every consumer;
a whole group of a grouped conv; a whole attention head). Units that share a space form a
*group* (the coupled layers; ``docs/design.md`` "The pipeline and its records").

A unit is prunable when none of its elements is pinned and it contains at least one element of
a *primary* space (a layer's own weight/bias channel dimension); only those are scored.

Example:
    >>> import torch, torch.fx
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = torch.fx.symbolic_trace(m)
    >>> _ = ShapeProp(gm).propagate(torch.randn(3, 4))
    >>> c = analyze(gm)
    >>> int(c.prunable.sum())   # the 8 hidden neurons
    8
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx

from .ops import apply_rule
from .spaces import AnalysisState, Builder, Coupling


def analyze(gm: torch.fx.GraphModule, *, frozen_modules: Iterable[str] = (), norm_width: bool = False) -> Coupling:
    """Build the element-level coupling of a shape-propagated GraphModule.

    Writes ``node.meta["oba.spaces"]`` on every node and returns the :class:`Coupling`.

    Args:
        gm: a GraphModule whose nodes carry ``tensor_meta`` (run shape propagation first).
        frozen_modules: qualified module names whose parameters must stay untouched
            (``ignore=`` of :func:`oba_fx.prune_graph`): all their spaces are pinned.
        norm_width: couple the channels a LayerNorm / RMSNorm normalises instead of pinning
            them (``embed_width=`` of :func:`oba_fx.prune_graph`: a transformer's residual width).
    """
    choice: dict[tuple[str, int], int] = {}
    modules = dict(gm.named_modules())
    for _ in range(8):  # each round moves some splits one dim inwards; a few rounds at most
        c, splits = _analyze_once(gm, frozen_modules, choice, norm_width, modules)
        moved = False
        for key, n_vary, space in splits:
            if choice.get(key, 0) + 1 < n_vary and c.pinned[c.units_of(space)].all():
                choice[key] = choice.get(key, 0) + 1
                moved = True
        if not moved:
            return c
    return c


def _analyze_once(gm: torch.fx.GraphModule, frozen_modules: Iterable[str],
                  choice: dict[tuple[str, int], int], norm_width: bool,
                  modules: dict[str, torch.nn.Module]) -> tuple[Coupling, list]:
    b = Builder()
    state = AnalysisState(split_choice=dict(choice), norm_width=norm_width, modules=modules)
    for node in gm.graph.nodes:
        apply_rule(gm, node, b, state)
    frozen = tuple(frozen_modules)
    for (name, _dim), s in b.param_spaces.items():
        if any(name == f or name.startswith(f + ".") for f in frozen):
            b.pin(s)
    return b.build(), state.splits


