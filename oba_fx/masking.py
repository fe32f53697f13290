"""The masked reference: the original graph with every removed channel zeroed at every tensor.

Slimming is correct when the slimmed network computes what this reference computes. Masks go
after every node whose value has removed indices, so a BatchNorm shift or a bias downstream of
a removed channel cannot make it non-zero again.

Example:
    >>> import torch, numpy as np
    >>> from oba_fx.tracing import trace
    >>> from oba_fx.coupling import analyze
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    >>> _ = ShapeProp(gm).propagate(torch.randn(3, 4))
    >>> c = analyze(gm)
    >>> ref = masked_reference(gm, c, c.prunable.copy())
    >>> float(ref(torch.randn(3, 4)).sub(ref.get_submodule("2").bias).abs().max().detach())
    0.0
"""

from __future__ import annotations


import numpy as np
import torch
import torch.fx

from . import meta as M
from .tracing import clone
from .coupling import Coupling, TensorSpaces


def masked_reference(gm: torch.fx.GraphModule, c: Coupling, removed: np.ndarray) -> torch.fx.GraphModule:
    """A copy of ``gm`` that multiplies each value by a 0/1 mask of its kept indices."""
    out = clone(gm)
    k = 0
    for node in list(out.graph.nodes):
        ts = node.meta.get(M.SPACES)
        if not isinstance(ts, TensorSpaces) or not ts.spaces or node.op == "output":
            continue
        shape = node.meta[M.TENSOR_META].shape
        mask = None
        for s in ts.spaces:
            keep = ~removed[c.units_of(s)]
            if keep.all():
                continue
            view = [1] * len(shape)
            view[s.dim] = s.size
            m = torch.as_tensor(keep, dtype=node.meta[M.TENSOR_META].dtype).view(view)
            mask = m if mask is None else mask * m
        if mask is None:
            continue
        name = f"_oba_mask_{k}"
        k += 1
        out.register_buffer(name, mask)
        with out.graph.inserting_after(node):
            attr = out.graph.get_attr(name)
        with out.graph.inserting_after(attr):
            mul = out.graph.call_function(torch.mul, (node, attr))
        node.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
    out.recompile()
    return out
