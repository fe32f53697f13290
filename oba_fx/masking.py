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
from .batches import module_device
from .ops import rule_for_node
from .tracing import clone
from .spaces import Coupling, TensorSpaces


def masked_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float | None, rms: bool) -> torch.Tensor:
    """LayerNorm (``rms=False``) or RMSNorm over the last dim, counting only the channels where
    ``keep`` is 1: what the slimmed norm computes, in the original width.

    Example:
        >>> x = torch.randn(2, 4)
        >>> keep = torch.tensor([1., 1., 0., 1.])
        >>> y = masked_norm(x, keep, None, None, 1e-5, rms=False)
        >>> torch.allclose(y[:, [0, 1, 3]], torch.nn.functional.layer_norm(x[:, [0, 1, 3]], (3,)), atol=1e-6)
        True
    """
    n = keep.sum()
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if rms:
        y = x * keep * torch.rsqrt((x * keep).pow(2).sum(-1, keepdim=True) / n + eps)
    else:
        mean = (x * keep).sum(-1, keepdim=True) / n
        d = (x - mean) * keep
        y = d * torch.rsqrt(d.pow(2).sum(-1, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * keep


def keep_channels(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros where ``keep`` (broadcast, bool) is false: a selection, not a product, so
    a removed channel is zero even where the original value is NaN or Inf (``0 / 0`` of a
    quotient of masked values), as it is absent from the slimmed network; the dtype is kept.

    Example:
        >>> keep_channels(torch.tensor([[float("nan"), 2.0]]), torch.tensor([False, True]))
        tensor([[0., 2.]])
    """
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _renormalise(out: torch.fx.GraphModule, node: torch.fx.Node, c: Coupling, removed: np.ndarray, k: int) -> bool:
    """Replace a LayerNorm / RMSNorm whose normalised channels lose some by :func:`masked_norm`."""
    rule = rule_for_node(out, node) if node.op in ("call_module", "call_function") else None
    if rule is None or rule.renormalises is None:
        return False
    x = node.args[0]
    ts = x.meta.get(M.SPACES) if isinstance(x, torch.fx.Node) else None
    nd = len(node.meta[M.TENSOR_META].shape)
    s = ts.at(nd - 1) if isinstance(ts, TensorSpaces) else None
    if s is None:
        return False
    keep = ~removed[c.units_of(s)]
    if keep.all():
        return False
    name = f"_oba_norm_keep_{k}"
    out.register_buffer(name, torch.as_tensor(keep, dtype=node.meta[M.TENSOR_META].dtype, device=module_device(out)))
    with out.graph.inserting_before(node):
        keep_node = out.graph.get_attr(name)
        if node.op == "call_module":
            m = out.get_submodule(node.target)
            w = out.graph.get_attr(f"{node.target}.weight") if getattr(m, "weight", None) is not None else None
            b = out.graph.get_attr(f"{node.target}.bias") if getattr(m, "bias", None) is not None else None
            eps = m.eps
        else:
            w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
            b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
            eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        new = out.graph.call_function(masked_norm, (x, keep_node, w, b, eps, rule.renormalises == "rms"))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    out.graph.erase_node(node)
    return True


def masked_reference(gm: torch.fx.GraphModule, c: Coupling, removed: np.ndarray) -> torch.fx.GraphModule:
    """A copy of ``gm`` that zeroes the removed indices of each value (:func:`keep_channels`), and whose
    LayerNorms / RMSNorms that lose channels normalise over the kept ones only."""
    out = clone(gm)
    k = 0
    for node in list(out.graph.nodes):
        if _renormalise(out, node, c, removed, k):
            k += 1
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
            m = torch.as_tensor(keep, dtype=torch.bool, device=module_device(out)).view(view)
            mask = m if mask is None else mask & m
        if mask is None:
            continue
        name = f"_oba_mask_{k}"
        k += 1
        out.register_buffer(name, mask)
        with out.graph.inserting_after(node):
            attr = out.graph.get_attr(name)
        with out.graph.inserting_after(attr):
            mul = out.graph.call_function(keep_channels, (node, attr))
        node.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
    out.recompile()
    return out
