"""Physical slimming: a new GraphModule with smaller modules and rewritten constants.

The op table (:mod:`oba_fx.ops`) says how each module and each shape constant is rewritten;
this module drives it over the graph, slices the tensor attributes read with ``get_attr``,
and checks every new shape against the prediction, raising instead of returning a wrong net.

Example:
    >>> import torch, numpy as np
    >>> from oba_fx.tracing import trace
    >>> from oba_fx.coupling import analyze
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> _ = ShapeProp(gm).propagate(torch.randn(3, 4))
    >>> c = analyze(gm)
    >>> removed = c.prunable.copy(); removed[np.nonzero(removed)[0][4:]] = False
    >>> slim(gm, c, removed, (torch.randn(3, 4),)).get_submodule("0").weight.shape
    torch.Size([4, 4])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from .tracing import clone, propagate_shapes
from .spaces import Coupling
from .errors import SurgeryError
from .ops import shape_of, new_shape, rule_for_node, slim_node


def _owner(gm: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    parent, _, attr = qualname.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), attr


def slim(gm: torch.fx.GraphModule, c: Coupling, removed: np.ndarray,
         example_inputs: Sequence) -> torch.fx.GraphModule:
    """Return a slimmed copy of ``gm`` without the units in ``removed``.

    ``gm`` must carry the coupling (node.meta) of ``c``; it is not modified.

    Raises:
        SurgeryError: if a new shape differs from the predicted one.
    """
    expected = {n.name: new_shape(n, c, removed) for n in gm.graph.nodes if shape_of(n) is not None}
    out = clone(gm)
    done_modules: set[str] = set()
    for node in out.graph.nodes:
        if node.op == "call_module":
            if node.target in done_modules:
                continue
            done_modules.add(node.target)
        slim_node(out, node, c, removed)
    # tensor attributes not sliced by a module rule (get_attr tensors, shared attributes)
    for (name, dim), s in c.param_spaces.items():
        kept = c.kept(s, removed)
        if kept.size == s.size:
            continue
        mod, attr = _owner(out, name)
        t = getattr(mod, attr)
        if t is None or t.shape[dim] != s.size:
            continue
        new = t.detach().index_select(dim, torch.as_tensor(kept, dtype=torch.long, device=t.device)).clone()
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        setattr(mod, attr, new)
    out.recompile()
    check_shapes(out, expected, example_inputs)
    return out


def check_shapes(gm: torch.fx.GraphModule, expected: dict[str, tuple], example_inputs: Sequence) -> None:
    """Shape-propagate ``gm`` and compare every node with ``expected``."""
    try:
        propagate_shapes(gm, example_inputs)
    except Exception as e:
        raise SurgeryError(f"the slimmed graph does not run: {type(e).__name__}: {e}") from e
    for node in gm.graph.nodes:
        want = expected.get(node.name)
        got = shape_of(node)
        if want is not None and got is not None and tuple(got) != tuple(want):
            rule = rule_for_node(gm, node) if node.op.startswith("call") else None
            raise SurgeryError(
                f"node {node.name!r} ({node.op} {node.target}, rule {getattr(rule, 'name', None)}) has shape "
                f"{tuple(got)} after slimming, expected {tuple(want)}; this is a bug in its slim rule — "
                "please report it; meanwhile pass ignore=[...] for that module")
