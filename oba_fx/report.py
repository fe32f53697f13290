"""The report of a pruning run: the dict a user reads in ``compiled.meta["oba"]``.

Built from the records the passes wrote (coupling, selection, verification); successive steps
compose with :func:`compose_kept` and :func:`merge_steps`.

Example:
    >>> compose_kept({"w": {0: [0, 2, 3]}}, {"w": {0: [1]}})
    {'w': {0: [2]}}
"""

from __future__ import annotations

import torch.fx

from .ops import count_flops
from .select import Selection, Target
from .spaces import Coupling


def build_report(gm: torch.fx.GraphModule, out: torch.fx.GraphModule, c: Coupling, sel: Selection, target: Target,
                 err: float | None) -> dict:
    """The dict stored in ``compiled.meta["oba"]`` after one pruning step of ``gm`` into ``out``."""
    kept: dict[str, dict[int, list[int]]] = {}
    params = dict(gm.named_parameters())
    for (name, dim), s in c.param_spaces.items():
        if name not in params:
            continue
        k = c.kept(s, sel.removed)
        if k.size < s.size:
            kept.setdefault(name, {})[dim] = k.tolist()
    return {
        "target": {"kind": target.kind, "value": target.value, "max_layer_ratio": target.max_layer_ratio,
                   "round_to": target.round_to, "min_channels": target.min_channels,
                   "ranking": target.ranking},
        "flops_before": count_flops(gm),
        "flops_after": count_flops(out),
        "params_before": sum(p.numel() for p in gm.parameters()),
        "params_after": sum(p.numel() for p in out.parameters()),
        "units_prunable": int(c.prunable.sum()),
        "units_removed": int(sel.removed.sum()),
        "groups": c.n_groups,
        "kept": kept,
        "barriers": [{"node": b.node, "op": b.op, "target": b.target, "reason": b.reason} for b in c.barriers],
        "heads": heads_report(c, sel.removed),
        "max_rel_error": err,
        "steps": 1,
    }


def heads_report(c, removed) -> dict[str, list[int]]:
    """``{attention module (or node): [heads before, heads after]}``.

    Example:
        >>> import torch, oba_fx
        >>> _ = torch.manual_seed(0)
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = torch.nn.MultiheadAttention(8, 4, batch_first=True)
        ...         self.head = torch.nn.Linear(8, 2)
        ...     def forward(self, x):
        ...         return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))
        >>> out = oba_fx.prune_graph(Net(), torch.randn(2, 5, 8), criterion="l1", channel_ratio=0.7)
        >>> out.meta["oba"]["heads"]
        {'attn': [4, 3]}
    """
    out: dict[str, list[int]] = {}
    for h in c.heads:
        key = h.module or h.node
        if key in out:
            key = f"{key}:{h.node}"
        out[key] = [h.space.size, int(c.kept(h.space, removed).size)]
    return out


def compose_kept(first: dict, second: dict) -> dict:
    """Kept indices of two successive prunings, in the numbering of the first one's input.

    Example:
        >>> compose_kept({"w": {0: [0, 2, 3]}}, {"w": {0: [1, 2]}, "v": {1: [0]}})
        {'w': {0: [2, 3]}, 'v': {1: [0]}}
    """
    out = {name: dict(dims) for name, dims in first.items()}
    for name, dims in second.items():
        for dim, idx in dims.items():
            prev = out.get(name, {}).get(dim)
            out.setdefault(name, {})[dim] = [prev[i] for i in idx] if prev is not None else list(idx)
    return out


def merge_steps(first: dict, last: dict, kept: dict, removed: int, steps: int) -> dict:
    """The report of a multi-step run: ``last``'s, with the before-numbers of ``first``, the
    composed kept indices and the total of removed units."""
    r = dict(last)
    heads = {k: [first["heads"].get(k, v)[0], v[1]] for k, v in last["heads"].items()}
    r.update(flops_before=first["flops_before"], params_before=first["params_before"], kept=kept, heads=heads,
             units_prunable=first["units_prunable"], units_removed=removed, steps=steps)
    return r
