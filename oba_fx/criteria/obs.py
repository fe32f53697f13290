"""``"obs"``: the loss change of removing a unit once its consumers are re-fit.

Optimal Brain Surgeon's view, made global. A layer ``Y = W X`` reads unit ``u`` through its
input columns ``S`` (a channel's ``k×k`` patch columns for a convolution, the ``H·W`` features of a
channel after a flatten, one feature of a linear map). If ``u`` goes and the rest of ``W`` is
re-fit by least squares (what :mod:`oba_fx.compensate` does), the output error per row left
over for output ``o`` is ``w_{o,S}ᵀ ((Σ⁻¹)_{SS})⁻¹ w_{o,S}``, with ``Σ`` the second moment of the
layer's input rows. To second order in the loss, with the Fisher approximation of the loss
Hessian at the layer's output, each row's error costs ``½ G_o`` per unit of squared error,
``G_o`` the mean squared per-sample loss gradient at output ``o``. So removing ``u`` costs

    ΔL(u) ≈ Σ_consumers ½ · P · Σ_o G_o · w_{o,S}ᵀ ((Σ⁻¹)_{SS})⁻¹ w_{o,S}

per sample (``P`` the layer's output positions per sample). Removals within a layer are not
independent (the re-fit of one leans on the others), so each layer is ranked greedily: the
cheapest unit is removed, ``Σ⁻¹`` and ``W`` get the OBS rank update, and the costs are recomputed;
a unit's cost is the running maximum of these marginal costs up to its removal, so the global
ranking takes each layer's units in its greedy order and prices joint removals jointly. A group
of a grouped convolution takes its outputs with it (nothing of the group is left to re-fit): its
cost is the Fisher-weighted energy of those outputs, ``½ P Σ_{o∈group} G_o w_oᵀ Σ w_o``.

The statistics come from one forward and one backward per calibration batch on the dense
network (``Σ`` from ``positions`` sampled output positions per image, ``G`` from all of them).
The costs are additive space costs ``{(weight name, dim): cost per index}`` (see
:func:`oba_fx.select.unit_scores`). They are loss changes, so they could be compared across layers
as they are (``ranking="global"``), but measured that way they concentrate removals in a few
layers; normalised within each coupling group (``ranking="group_max"``, the default) they did
better in every cell of ``benchmarks/ranking.py`` (pretrained ResNet-56 and ResNet-20, one-shot
with compensation, 0.7 / 0.5 / 0.35 of the FLOPs, three seeds: +1.4 to +9.9 points). Only ``nn.Conv2d`` (zero padding) and
``nn.Linear`` consumers are modelled; a unit read by no such layer is not ranked (kept).

Example:
    >>> import torch, oba_fx
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> data = [(torch.randn(32, 6), torch.randint(0, 3, (32,)))]
    >>> out = oba_fx.prune_graph(m, torch.randn(1, 6), criterion="obs", data=data, channel_ratio=0.5,
    ...                          verbose=False)
    >>> out.get_submodule("0").out_features, out.meta["oba"]["target"]["ranking"]
    (8, 'group_max')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .. import meta as M
from ..errors import BadInputError
from .context import ScoreContext

log = logging.getLogger(__name__)

#: sampled output positions per image for the input second moment of a convolution
POSITIONS = 64
#: ridge added to the second moment, relative to its mean diagonal
RIDGE = 1e-3


@dataclass
class _Layer:
    """Running statistics of one consumer layer."""

    name: str
    module: nn.Module
    xtx: torch.Tensor | None = None
    rows: int = 0
    g2: torch.Tensor | None = None
    grows: int = 0
    positions: int = 0
    outputs: list = field(default_factory=list)


def obs(ctx: ScoreContext, batches: Iterable[tuple[Any, Any]]) -> dict[tuple[str, int], torch.Tensor]:
    """Space costs of every unit read by a ``Conv2d`` / ``Linear`` layer of ``ctx.model``."""
    gm = ctx.model
    c = getattr(gm, "meta", {}).get(M.COUPLING) if isinstance(getattr(gm, "meta", None), dict) else None
    if c is None:
        raise BadInputError("criterion 'obs' reads the channel coupling of the graph: use it through "
                            "oba_fx.prune_graph (or run oba_fx.passes.CouplingPass on the GraphModule first)")
    layers = _consumers(gm)
    gen = torch.Generator().manual_seed(ctx.seed)
    handles = [L.module.register_forward_hook(_recorder(L, gen)) for L in layers.values()]
    try:
        for x, y in batches:
            _accumulate(gm, layers, x, y, ctx)
    finally:
        for h in handles:
            h.remove()
    out: dict[tuple[str, int], torch.Tensor] = {}
    for L in layers.values():
        if L.rows:
            out.update(_layer_costs(L, c))
    log.info("obs: costs for %d consumer layers", len(out))
    return out


def _consumers(gm: torch.fx.GraphModule) -> dict[str, _Layer]:
    layers = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in layers:
            continue
        m = gm.get_submodule(node.target)
        if type(m) is nn.Linear or (type(m) is nn.Conv2d and m.padding_mode == "zeros"
                                     and not isinstance(m.padding, str)):
            layers[node.target] = _Layer(node.target, m)
    return layers


def _recorder(L: _Layer, gen: torch.Generator):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        rows = _input_rows(module, inputs[0].detach(), gen)
        xtx = rows.T @ rows
        L.xtx = xtx if L.xtx is None else L.xtx + xtx
        L.rows += rows.shape[0]
        n = output.shape[0]
        L.positions = output.numel() // (n * _out_features(module))
        L.outputs.append(output)
    return hook


def _out_features(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _input_rows(m: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows of the least-squares problem (float64): input patches at sampled positions, or tokens."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).double()
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C·k², L)
    n_pos = cols.shape[-1]
    if n_pos > POSITIONS:
        idx = torch.randperm(n_pos, generator=gen)[:POSITIONS].to(cols.device)
        cols = cols[..., idx]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()


def _accumulate(gm: torch.fx.GraphModule, layers: dict[str, _Layer], x: Any, y: Any, ctx: ScoreContext) -> None:
    """One forward (recording inputs and outputs) and the loss gradients at every recorded output."""
    for L in layers.values():
        L.outputs.clear()
    with torch.enable_grad():
        loss = ctx.loss_fn(gm(x), y)
        outs = [(L, o) for L in layers.values() for o in L.outputs if o.requires_grad]
        grads = torch.autograd.grad(loss, [o for _, o in outs], allow_unused=True) if outs else []
    for (L, o), g in zip(outs, grads):
        if g is None:
            continue
        n = g.shape[0]
        g = (g.detach().double() * n)  # per-sample loss gradients (the loss is a batch mean)
        ch = 1 if isinstance(L.module, nn.Conv2d) else g.dim() - 1
        sq = g.square().sum(dim=[d for d in range(g.dim()) if d != ch])
        L.g2 = sq if L.g2 is None else L.g2 + sq
        L.grows += g.numel() // g.shape[ch]
    for L in layers.values():
        L.outputs.clear()


def _layer_costs(L: _Layer, c) -> dict[tuple[str, int], torch.Tensor]:
    m = L.module
    sigma = L.xtx / L.rows
    d = sigma.shape[0]
    sigma = sigma + RIDGE * float(sigma.diagonal().mean().clamp_min(1e-12)) * torch.eye(d, dtype=sigma.dtype,
                                                                                       device=sigma.device)
    W = m.weight.detach().double().reshape(m.weight.shape[0], -1)
    G = (L.g2 / max(L.grows, 1)) if L.g2 is not None else torch.zeros(_out_features(m), dtype=torch.float64,
                                                                       device=W.device)
    k2 = int(np.prod(m.kernel_size)) if isinstance(m, nn.Conv2d) else 1
    scale = 0.5 * L.positions
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        return _grouped_costs(L, c, sigma, G, W, k2, scale)
    space = c.param_spaces.get((f"{L.name}.weight", 1))
    if space is None:
        return {}
    units = c.units_of(space)
    cand = [u for u in np.unique(units) if c.prunable[u]]
    cost = torch.zeros(space.size, dtype=torch.float64)
    cols = {u: np.nonzero(units == u)[0] for u in cand}
    sizes = {len(v) for v in cols.values()}
    if not cand:
        return {(f"{L.name}.weight", 1): cost}
    G = G.to(W.device)
    if len(sizes) == 1 and len(cand) <= GREEDY_MAX_UNITS:
        marg = _greedy_marginals(sigma, W, G, cand, cols, k2)
    else:  # units of unequal widths: each unit's cost alone
        P = torch.linalg.inv(sigma)
        marg = {u: _alone(P, W, G, cols[u], k2) for u in cand}
    for u in cand:
        cost[cols[u]] = scale * marg[u] / len(cols[u])
    return {(f"{L.name}.weight", 1): cost}


#: consumers reading more prunable units than this get each unit's cost alone (no greedy order)
GREEDY_MAX_UNITS = 1024


def _columns(chans: np.ndarray, k2: int) -> np.ndarray:
    return (chans[:, None] * k2 + np.arange(k2)[None, :]).reshape(-1)


def _alone(P: torch.Tensor, W: torch.Tensor, G: torch.Tensor, chans: np.ndarray, k2: int) -> float:
    S = torch.as_tensor(_columns(chans, k2), device=W.device)
    M = torch.linalg.inv(P[S][:, S])
    WS = W[:, S]
    return float((G[:, None] * (WS @ M) * WS).sum())


def _greedy_marginals(sigma: torch.Tensor, W: torch.Tensor, G: torch.Tensor, cand: list, cols: dict,
                      k2: int) -> dict:
    """Greedy OBS within one layer: remove the cheapest unit, re-fit the rest (rank update of
    ``Σ⁻¹`` and of ``W``), repeat. A unit's cost is the running maximum of the marginal costs up to
    its removal, so the global ranking removes each layer's units in its greedy order and joint
    removals are priced jointly (the cost of removing two units is not the sum of their costs
    alone)."""
    P = torch.linalg.inv(sigma)
    W = W.clone()
    idx = torch.as_tensor(np.stack([_columns(cols[u], k2) for u in cand]), device=W.device)  # (n, m)
    active = torch.ones(len(cand), dtype=torch.bool)
    out: dict = {}
    running = 0.0
    for _ in range(len(cand)):
        a = torch.nonzero(active).reshape(-1)
        ia = idx[a]                                                   # (n_a, m)
        blocks = P[ia[:, :, None], ia[:, None, :]]                     # (n_a, m, m)
        Minv = torch.linalg.inv(blocks)
        Wb = W[:, ia].permute(1, 0, 2)                                 # (n_a, out, m)
        costs = torch.einsum("aom,amn,aon,o->a", Wb, Minv, Wb, G)
        j = int(torch.argmin(costs))
        u = a[j]
        running = max(running, float(costs[j]))
        out[cand[int(u)]] = running
        S, M = ia[j], Minv[j]
        W -= (W[:, S] @ M) @ P[S, :]                                   # re-fit the others (OBS update)
        P -= P[:, S] @ M @ P[S, :]                                     # inverse without the removed columns
        P[S, :] = 0.0
        P[:, S] = 0.0
        P[S, S] = 1.0                                                  # keep later blocks invertible
        active[u] = False
    return out


def _grouped_costs(L: _Layer, c, sigma, G, W, k2, scale) -> dict[tuple[str, int], torch.Tensor]:
    """A grouped convolution loses a whole group with its outputs: their Fisher-weighted energy."""
    m = L.module
    space = c.param_spaces.get((f"{L.name}.weight", 0))
    if space is None:
        return {}
    g, ipg, opg = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
    w = ipg * k2
    k = torch.arange(g, device=W.device)
    blocks = sigma.reshape(g, w, g, w)[k, :, k, :]                        # (g, w, w): each group's inputs
    Wg = W.reshape(g, opg, w)
    energy = torch.einsum("gom,gmn,gon->go", Wg, blocks, Wg)               # all groups at once, on the device
    per_group = scale * (G.to(W.device).reshape(g, opg) * energy).sum(dim=1) / opg
    return {(f"{L.name}.weight", 0): per_group.repeat_interleave(opg).cpu()}
