"""Gradient and curvature estimates that the criteria build on: the batch gradient,
per-sample gradients, the empirical Fisher diagonal and Hutchinson's ``diag(H)``.

Every function reads the model's parameters and passes copies of its buffers (running statistics
are never updated); the model is never mutated.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(3, 2).double().eval()
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    >>> empirical_fisher_diagonal(m, (x, y))["weight"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .hvp import LossFn, default_loss_fn, fused_hvp, math_attention
from oba_fx.errors import BadInputError


def _state(model: nn.Module) -> tuple[dict, dict]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    return params, buffers


def gradient(model: nn.Module, x: Any, y: Any, names: Sequence[str], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Plain batch gradient (one forward + backward); buffers are copies."""
    params, buffers = _state(model)
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    bufs = {n: b.clone() for n, b in buffers.items()}
    with torch.enable_grad():
        loss = loss_fn(functional_call(model, ({**params, **leaves}, bufs), (x,)), y)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, gs)}


def _samples_coupled(model: nn.Module) -> bool:
    """Whether a sample's output may depend on the other samples (or on randomness)."""
    return any(m.training for m in model.modules())


def _per_sample_gradient_chunks(model: nn.Module, batch: tuple[Any, Any], names: Sequence[str], loss_fn: LossFn,
                                chunk: int) -> Iterator[dict[str, torch.Tensor]]:
    """``{name: G}`` for consecutive chunks of samples, ``G[i]`` the gradient of sample ``i``'s loss."""
    params, buffers = _state(model)
    x, y = batch
    if not _samples_coupled(model):
        def sample_loss(p: dict, xn: torch.Tensor, yn: Any) -> torch.Tensor:
            out = functional_call(model, ({**params, **p}, buffers), (xn.unsqueeze(0),))
            return loss_fn(out, yn.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        scored = {n: params[n] for n in names}
        for i in range(0, x.shape[0], chunk):
            with math_attention():  # the fused CPU attention kernel has no vmap rule
                g = per_sample(scored, x[i:i + chunk], y[i:i + chunk])
            yield g
        return
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    bufs = {n: b.clone() for n, b in buffers.items()}
    with torch.enable_grad():
        z = functional_call(model, ({**params, **leaves}, bufs), (x,))
        for i in range(z.shape[0]):
            li = loss_fn(z[i:i + 1], y[i:i + 1])
            gs = torch.autograd.grad(li, list(leaves.values()), retain_graph=True, allow_unused=True)
            yield {n: (torch.zeros_like(leaves[n]) if g is None else g).unsqueeze(0) for n, g in zip(names, gs)}


def _names(model: nn.Module, param_names: Sequence[str] | None) -> list[str]:
    if param_names is not None:
        return list(param_names)
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


def per_sample_gradients(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                         loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """``{name: G}`` with ``G[n] = ∇_θ loss_fn(z_n, y_n)``, the gradient of sample ``n``'s loss.

    ``z_n`` is sample ``n``'s row of the logits of the whole batch (in train mode BatchNorm's batch
    statistics therefore couple the samples, and are differentiated). Uses ``vmap(grad)`` when
    every module is in eval mode, else one forward and a backward per sample. Memory: batch size
    times the parameters (:func:`empirical_fisher_diagonal` works in chunks instead).

    Example:
        >>> m = torch.nn.Linear(3, 2).double().eval()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> G = per_sample_gradients(m, (x, y))
        >>> G["weight"].shape
        torch.Size([4, 2, 3])
        >>> g = torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), m.weight)[0]
        >>> torch.allclose(G["weight"].mean(0), g)
        True
    """
    names = _names(model, param_names)
    n = batch[0].shape[0]
    chunks = list(_per_sample_gradient_chunks(model, batch, names, loss_fn or default_loss_fn, n))
    return {k: torch.cat([c[k] for c in chunks]) for k in names}


#: per-sample gradients held at once by :func:`empirical_fisher_diagonal` (elements)
FISHER_CHUNK_ELEMENTS = 1 << 25


def empirical_fisher_diagonal(model: nn.Module, batch: tuple[Any, Any], *, param_names: Sequence[str] | None = None,
                              loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """``diag((1/N) Σ_n g_n g_nᵀ) = (1/N) Σ_n g_n²`` with ``g_n`` as in :func:`per_sample_gradients`,
    accumulated over chunks of samples (at most :data:`FISHER_CHUNK_ELEMENTS` gradient entries
    at once)."""
    names = _names(model, param_names)
    params = dict(model.named_parameters())
    n_params = max(1, sum(params[k].numel() for k in names))
    chunk = max(1, FISHER_CHUNK_ELEMENTS // n_params)
    acc = {k: torch.zeros_like(params[k], memory_format=torch.contiguous_format).detach() for k in names}
    n = 0
    for G in _per_sample_gradient_chunks(model, batch, names, loss_fn or default_loss_fn, chunk):
        for k in names:
            acc[k] += G[k].square().sum(0)
        n += next(iter(G.values())).shape[0] if G else 0
    return {k: a / max(n, 1) for k, a in acc.items()}


def rademacher_like(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent ±1 entries shaped like each tensor (drawn on the CPU from ``generator``)."""
    return {n: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(dtype=p.dtype, device=p.device)
            for n, p in params.items()}


def hutchinson_diagonal(model: nn.Module, batch: tuple[Any, Any], probes: int | Sequence[Mapping[str, torch.Tensor]],
                        *, param_names: Sequence[str] | None = None, loss_fn: LossFn | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Hutchinson estimate ``(1/K) Σ_k r_k ⊙ (H r_k)`` of the full Hessian's diagonal.

    Args:
        model, batch, param_names, loss_fn: as in :func:`oba_fx.hvp.fused_hvp`.
        probes: the number ``K`` of Rademacher probes to draw, or the probes themselves
            (``[{name: r_k}]``; with the ``K ≥ n`` rows of a Hadamard matrix the estimate is exact).
        generator: draws the probes (default seed 0).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
        >>> x, y = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
        >>> d = hutchinson_diagonal(m, (x, y), 4)
        >>> d["0.weight"].shape
        torch.Size([2, 2])
    """
    params, _ = _state(model)
    names = _names(model, param_names)
    if isinstance(probes, int):
        if probes < 1:
            raise BadInputError(f"probes must be >= 1, got {probes}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        probe_list: Sequence[Mapping[str, torch.Tensor]] = [
            rademacher_like({n: params[n] for n in names}, gen) for _ in range(probes)]
    else:
        probe_list = list(probes)
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for r in probe_list:
        hv = fused_hvp(model, batch, param_names=names, loss_fn=loss_fn, hessian="full", tangents=r).hvps
        for n in names:
            acc[n] += r[n] * hv[n]
    return {n: a / len(probe_list) for n, a in acc.items()}
