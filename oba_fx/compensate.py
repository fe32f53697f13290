"""Compensation: re-fit the layers that read removed units so that they reproduce the dense
network's outputs (the "update what remains" half of Optimal Brain Surgeon; ``docs/design.md`` "Compensation").

For every conv / linear layer whose input columns lose units (and, with ``scope="all"``, every
conv / linear layer), its kept input weights and its bias are re-fit by ridge least squares:

    minimise  ‖X W + 1 bᵀ − Y‖²  +  λ ‖W‖²,      λ = ridge · mean(diag(XᵀX))

where the rows of ``X`` are the layer's inputs in the **pruned** network (the masked reference,
with every layer upstream already compensated; kept input columns only, conv inputs as
``unfold`` patches) and the rows of ``Y`` are the **dense** network's outputs of the same layer on
the same images (kept output channels only: removed outputs are masked anyway). The bias is not
regularised. Only ``XᵀX``, ``XᵀY`` and ``ΣY²`` are accumulated (float64), never ``X`` itself.

Convolution rows: for each image, ``positions`` output positions drawn without replacement from
a generator seeded with ``seed``, the layer and the batch index, so that several processes sharing
the batches sample what one process would (all positions when ``positions`` is ``None`` or at least the
number of output positions); a linear layer uses every row (token) of its input.

One pass over the data: the dense graph and the masked reference are walked node by node in
lock step, each node evaluated on all calibration batches and its values freed after their last
use; when the masked walk reaches a layer to re-fit, the dense walk is advanced to that layer,
the layer is re-fit, and only then is the masked layer evaluated, with its new weights.

Not handled, and logged with the reason (never approximated): grouped convolutions (the
coupling removes a whole group together with its outputs, so a kept group never reads a removed
unit), transposed and 3-D convolutions, non-zero padding modes, string padding, layers whose
weight is shared by several calls.

Example:
    >>> import torch, numpy as np
    >>> from oba_fx.passes.pipeline import analyze_model
    >>> _ = torch.manual_seed(0)
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = analyze_model(m, (torch.randn(2, 4),))
    >>> c = gm.meta["oba.coupling"]
    >>> removed = np.zeros(c.n_units, bool); removed[c.units_of(c.param_spaces[("0.weight", 0)])[:3]] = True
    >>> rec = compensate(gm, c, removed, [(torch.randn(64, 4), None)], progress=False)
    >>> [f.weight for f in rec.fits], rec.fits[0].rel_error_after < rec.fits[0].rel_error_before
    (['2.weight'], True)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batches import inputs_of, take
from .spaces import Coupling
from .distributed import all_reduce_sum, is_main, shard, sum_number, world
from .masking import masked_reference
from .tracing import eval_mode
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerFit:
    """One re-fit layer.

    Attributes:
        node: the layer's node in the graph.
        weight: qualified name of its weight (its bias is ``bias``, or ``None``).
        bias: qualified name of its bias, or ``None``.
        kind: ``"conv"`` or ``"linear"``.
        inputs_kept / inputs: kept and total input channels (features).
        outputs_kept: kept output channels re-fit.
        rows: rows of the least-squares problem (sampled positions × images, or tokens).
        rel_error_before / rel_error_after: ``‖X W + b − Y‖ / ‖Y‖`` over those rows (kept
            outputs), with the layer's weights before and after the re-fit, on the pruned
            network's inputs (upstream layers already re-fit).
    """

    node: str
    weight: str
    bias: str | None
    kind: str
    inputs_kept: int
    inputs: int
    outputs_kept: int
    rows: int
    rel_error_before: float
    rel_error_after: float


@dataclass(frozen=True)
class Skipped:
    """A layer that reads removed units (or would be re-fit) but was left as it is, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class Compensation:
    """What :func:`compensate` did (``gm.meta["oba.compensation"]``).

    Attributes:
        fits: the re-fit layers, in graph order.
        skipped: layers left unchanged, with the reason.
        images: calibration images (first-dimension rows of the inputs) used.
        batches: calibration batches used.
        positions: sampled output positions per image for convolutions (``None``: all).
        ridge: the relative ridge.
        seed: seed of the position sampling.
        scope: ``"removed"`` (layers reading removed units) or ``"all"``.
        output_rel_error: ``‖out_pruned − out_dense‖ / ‖out_dense‖`` of the network's output
            after compensation, on the calibration data.
        seconds: wall time.
    """

    fits: tuple[LayerFit, ...]
    skipped: tuple[Skipped, ...]
    images: int
    batches: int
    positions: int | None
    ridge: float
    seed: int
    scope: str
    output_rel_error: float
    seconds: float


@dataclass(frozen=True)
class _Layer:
    node: str
    weight: str
    bias: str | None
    kind: str
    module: nn.Module | None
    kept_in: np.ndarray
    n_in: int
    kept_out: np.ndarray
    ref_node: str = ""  # the same layer's node in the reference network ("": ``node``)
    ref_out: np.ndarray | None = None  # the reference's output channels matching ``kept_out`` (None: the same)

    @property
    def target_out(self) -> np.ndarray:
        """The output channels of the reference layer that the kept outputs are fit to."""
        return self.kept_out if self.ref_out is None else self.ref_out


# ------------------------------------------------------------------------------ which layers
def _get(root: nn.Module, name: str) -> torch.Tensor:
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _kept(c: Coupling, removed: np.ndarray, name: str, dim: int, size: int) -> np.ndarray:
    s = c.param_spaces.get((name, dim))
    return np.arange(size) if s is None else c.kept(s, removed)


def _conv_problem(m: nn.Module) -> str | None:
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or isinstance(m, nn.Conv3d):
        return f"{type(m).__name__} is not supported (only Conv1d / Conv2d)"
    if m.groups != 1:
        return ("grouped convolution: the coupling removes whole groups with their outputs, so a kept group "
                "reads no removed unit; per-group re-fit for upstream error is not implemented")
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only zero padding is unfolded exactly)"
    if isinstance(m.padding, str) and m.padding != "valid":
        return f"padding={m.padding!r} (give the padding as numbers)"
    return None


def _as_layer(gm: torch.fx.GraphModule, n: torch.fx.Node) -> tuple | None:
    """``(weight, bias or None, kind, key, module or None)`` of a conv / linear call, else ``None``.

    ``key`` names what a shared use would share (the module, or the weight tensor of an
    ``F.linear`` on ``get_attr`` weights)."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            return None
        b = f"{n.target}.bias" if getattr(m, "bias", None) is not None else None
        return f"{n.target}.weight", b, ("linear" if isinstance(m, nn.Linear) else "conv"), n.target, m
    if n.op == "call_function" and n.target is F.linear:
        wn = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        bn = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not (isinstance(wn, torch.fx.Node) and wn.op == "get_attr"):
            return None
        if bn is not None and not (isinstance(bn, torch.fx.Node) and bn.op == "get_attr"):
            return None
        return wn.target, bn.target if bn is not None else None, "linear", wn.target, None
    return None


def find_layers(gm: torch.fx.GraphModule, c: Coupling, removed: np.ndarray, scope: str = "removed"
                ) -> tuple[list[_Layer], list[Skipped]]:
    """The layers to re-fit, in graph order, and the ones that qualify but cannot be handled.

    A layer is an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` call or an ``F.linear`` on
    ``get_attr`` weights. With ``scope="removed"`` it qualifies when its weight's input dimension
    (dim 1) has removed indices; with ``scope="all"`` every layer with a kept output qualifies.
    """
    if scope not in ("removed", "all"):
        raise BadInputError(f"scope must be 'removed' or 'all', got {scope!r}")
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            uses[n.target] = uses.get(n.target, 0) + 1
    layers, skipped = [], []
    for n in gm.graph.nodes:
        hit = _as_layer(gm, n)
        if hit is None:
            continue
        w, b, kind, key, mod = hit
        problem = _conv_problem(mod) if kind == "conv" else None
        weight = _get(gm, w)
        kept_in = _kept(c, removed, w, 1, weight.shape[1])
        kept_out = _kept(c, removed, w, 0, weight.shape[0])
        reads_removed = kept_in.size < weight.shape[1]
        if not (reads_removed or scope == "all") or kept_out.size == 0:
            continue
        if problem is None and uses.get(key, 0) > 1:
            problem = f"{key!r} is used by {uses[key]} nodes (shared weights): one re-fit cannot serve every call"
        if problem is None and kept_in.size == 0:
            problem = "every input column is removed: only the bias is left (not re-fit)"
        if problem is not None:
            if reads_removed:
                log.warning("compensation skips %s (%s): %s", n.name, w, problem)
            skipped.append(Skipped(n.name, problem))
            continue
        layers.append(_Layer(n.name, w, b, kind, mod, kept_in, int(weight.shape[1]), kept_out))
    return layers, skipped


def retarget(gm: torch.fx.GraphModule, layers: list[_Layer], reference: torch.fx.GraphModule,
             reference_outputs: Mapping[str, Sequence[int]] | None = None) -> tuple[list[_Layer], list[Skipped]]:
    """Point every layer at the layer of ``reference`` with the same weight name, and at the
    reference output channels its kept outputs are.

    A layer is found by its weight's qualified name (slimming keeps module and parameter
    names). ``reference_outputs[weight]`` gives, for each output channel of ``gm``'s layer, the
    output channel of the reference layer it was (the kept indices of earlier pruning steps);
    a layer not listed must have as many outputs as its reference. A layer that ``reference``
    does not hold exactly once is skipped with the reason.

    Example:
        >>> import torch
        >>> from oba_fx.passes.pipeline import analyze_model
        >>> big = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 2)))
        >>> small = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> small = analyze_model(small, (torch.randn(1, 3),))
        >>> c = small.meta["oba.coupling"]
        >>> layers, _ = find_layers(small, c, np.zeros(c.n_units, bool), "all")
        >>> out, skipped = retarget(small, layers, big, {"0.weight": [0, 2, 3, 5]})
        >>> [(l.ref_node, l.target_out.tolist()) for l in out], skipped
        ([('_0', [0, 2, 3, 5]), ('_1', [0, 1])], [])
    """
    where: dict[str, list[str]] = {}
    for n in reference.graph.nodes:
        hit = _as_layer(reference, n)
        if hit is not None:
            where.setdefault(hit[0], []).append(n.name)
    reference_outputs = reference_outputs or {}
    out, skipped = [], []
    for layer in layers:
        nodes = where.get(layer.weight, [])
        if len(nodes) != 1:
            why = f"the reference network has {len(nodes)} layers with the weight {layer.weight!r} (expected one)"
            log.warning("compensation skips %s: %s", layer.node, why)
            skipped.append(Skipped(layer.node, why))
            continue
        n_ref, n_cur = int(_get(reference, layer.weight).shape[0]), int(_get(gm, layer.weight).shape[0])
        given = reference_outputs.get(layer.weight)
        idx = np.arange(n_cur) if given is None else np.asarray(given, dtype=np.int64)
        in_range = idx.size == 0 or 0 <= idx.min() <= idx.max() < n_ref
        if (given is None and n_cur != n_ref) or idx.size != n_cur or not in_range:
            raise BadInputError(
                f"compensation: layer {layer.node} ({layer.weight}) has {n_cur} outputs and its reference layer "
                f"{n_ref}; reference_outputs[{layer.weight!r}] must give, for each of the {n_cur}, the reference "
                f"output channel it was (got {idx.size} indices)")
        out.append(replace(layer, ref_node=nodes[0], ref_out=idx[layer.kept_out]))
    return out, skipped


# ------------------------------------------------------------------------------ least squares
def design_rows(layer: _Layer, x: torch.Tensor, y: torch.Tensor, positions: int | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)`` rows of one batch: kept input columns (conv: unfolded patches, channel-major
    like the weight) and the target's channels matching the kept outputs (``y`` is the
    reference layer's output), at the sampled positions (conv) or every row."""
    if layer.kind == "linear":
        X = x.reshape(-1, x.shape[-1])[:, torch.as_tensor(layer.kept_in, device=x.device)]
        Y = y.reshape(-1, y.shape[-1])[:, torch.as_tensor(layer.target_out, device=y.device)]
        return X, Y
    m = layer.module
    k, d, s = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    p = (0,) * len(k) if isinstance(m.padding, str) else tuple(m.padding)  # a string here is "valid"
    if isinstance(m, nn.Conv1d):  # as a 2-D conv over a height of 1
        x, y = x.unsqueeze(-2), y.unsqueeze(-2)
        k, d, p, s = (1, *k), (1, *d), (0, *p), (1, *s)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kk, L)
    n, L = cols.shape[0], cols.shape[2]
    y = y.reshape(n, y.shape[1], L)
    if positions is not None and positions < L:
        idx = torch.rand(n, L, generator=gen).argsort(dim=1)[:, :positions].to(x.device)
        cols = cols.gather(2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1))
        y = y.gather(2, idx.unsqueeze(1).expand(-1, y.shape[1], -1))
    kk = int(np.prod(k))
    ci = torch.as_tensor((layer.kept_in[:, None] * kk + np.arange(kk)).ravel(), device=x.device)
    X = cols[:, ci].transpose(1, 2).reshape(-1, ci.numel())
    Y = y[:, torch.as_tensor(layer.target_out, device=y.device)].transpose(1, 2).reshape(-1, layer.kept_out.size)
    return X, Y


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, n_weight: int, ridge: float) -> torch.Tensor:
    """``(XᵀX + λ D)⁻¹ XᵀY`` with ``D`` the identity on the first ``n_weight`` columns (weights)
    and zero on the rest (the bias column), ``λ = ridge · mean(diag(XᵀX)[:n_weight])``.

    Example:
        >>> X = torch.tensor([[1., 0.], [0., 1.], [1., 1.]], dtype=torch.float64)
        >>> ridge_solve(X.T @ X, X.T @ torch.tensor([[1.], [2.], [3.]], dtype=torch.float64), 2, 0.0).flatten()
        tensor([1., 2.], dtype=torch.float64)
    """
    lam = ridge * float(torch.diagonal(xtx)[:n_weight].mean()) if n_weight else 0.0
    reg = torch.zeros(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    reg[:n_weight] = lam
    a = xtx + torch.diag(reg)
    try:
        return torch.linalg.solve(a, xty)
    except RuntimeError:  # singular (ridge 0 on rank-deficient inputs): minimum-norm solution
        # "gelsd" (SVD based, rank-deficient systems) exists only on the CPU; a rare fallback, once per layer
        return torch.linalg.lstsq(a.cpu(), xty.cpu(), driver="gelsd").solution.to(xty.device)


def _current(root: nn.Module, layer: _Layer) -> torch.Tensor:
    """The layer's kept weights (and bias) as a ``(columns, outputs)`` float64 matrix."""
    w = _get(root, layer.weight).detach()
    ko, ki = torch.as_tensor(layer.kept_out, device=w.device), torch.as_tensor(layer.kept_in, device=w.device)
    theta = w[ko][:, ki].reshape(ko.numel(), -1).double().T
    if layer.bias is not None:
        theta = torch.cat([theta, _get(root, layer.bias).detach()[ko].double()[None]], 0)
    return theta


def _rel_error(theta: torch.Tensor, xtx, xty, yy: float) -> float:
    err = float((theta * (xtx @ theta)).sum() - 2 * (theta * xty).sum() + yy)
    return float(np.sqrt(max(err, 0.0) / yy)) if yy > 0 else 0.0


def _write(root: nn.Module, layer: _Layer, theta: torch.Tensor) -> None:
    w = _get(root, layer.weight)
    ko, ki = torch.as_tensor(layer.kept_out, device=w.device), torch.as_tensor(layer.kept_in, device=w.device)
    nw = ki.numel() * int(np.prod(w.shape[2:]))
    with torch.no_grad():
        w[ko.unsqueeze(1), ki.unsqueeze(0)] = theta[:nw].T.reshape(ko.numel(), ki.numel(), *w.shape[2:]).to(w)
        if layer.bias is not None:
            b = _get(root, layer.bias)
            b[ko] = theta[nw].to(b)


# ------------------------------------------------------------------------------ lock-step walk
class _Walk:
    """A graph evaluated node by node on every batch, each value freed after its last use."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: list[tuple]) -> None:
        self.its = [torch.fx.Interpreter(gm, garbage_collect_values=True) for _ in inputs]
        for it, x in zip(self.its, inputs):
            it.env, it.args_iter = {}, iter(x)
        self.nodes = iter(gm.graph.nodes)

    def _run(self, node: torch.fx.Node) -> None:
        for it in self.its:
            it.env[node] = it.run_node(node)
            for dead in it.user_to_last_uses.get(node, []):
                if dead is not node:
                    del it.env[dead]

    def step(self) -> torch.fx.Node:
        node = next(self.nodes)
        self._run(node)
        return node

    def until(self, name: str) -> torch.fx.Node:
        """Evaluate up to and including the node called ``name``."""
        for node in self.nodes:
            self._run(node)
            if node.name == name:
                return node
        raise RuntimeError(f"compensation: the dense graph has no node {name!r} after the previous layer")

    def values(self, node: torch.fx.Node) -> list:
        return [it.env[node] for it in self.its]

    def finish(self) -> list:
        """Evaluate the rest of the graph; the outputs, one per batch."""
        for node in self.nodes:
            self._run(node)
        last = next(reversed(self.its[0].graph.nodes))
        return [it.env[last] for it in self.its]


def _batches(data: Iterable, max_batches: int | None) -> tuple[list[tuple], list[int]]:
    """This rank's share of the calibration inputs (all of them without a process group), and
    their indices among all batches (position sampling is seeded per batch index, so it does not
    depend on how the batches are shared out)."""
    out, index = [], []
    for i, batch in shard(enumerate(take(data, max_batches))):
        x = inputs_of(batch)
        out.append(tuple(x) if isinstance(x, (tuple, list)) else (x,))
        index.append(i)
    if not out:
        more = f" for each of the {world()} ranks" if world() > 1 else ""
        raise BadInputError(f"compensation needs calibration batches{more}: data= gave too few (pass an iterable "
                            "of (inputs, targets) batches, or bare input batches)")
    return out, index


def _flat(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _flat(x)]
    return []


def _fit(layer: _Layer, root: nn.Module, xs: list, ys: list, positions: int | None, ridge: float,
         gens: list[torch.Generator]) -> LayerFit:
    """Accumulate the normal equations over the batches, re-fit ``layer`` in ``root``."""
    xtx = xty = yy_t = None
    rows = 0
    for x, y, gen in zip(xs, ys, gens):
        X, Y = design_rows(layer, x, y, positions, gen)
        X, Y = X.double(), Y.double()
        if layer.bias is not None:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], 1)
        a, b = X.T @ X, X.T @ Y
        xtx, xty = (a, b) if xtx is None else (xtx + a, xty + b)
        yy_t = Y.square().sum() if yy_t is None else yy_t + Y.square().sum()  # on the device: no wait per batch
        rows += X.shape[0]
    xtx, xty = all_reduce_sum(xtx), all_reduce_sum(xty)  # the other ranks' images (data parallel)
    yy, rows = sum_number(float(yy_t) if yy_t is not None else 0.0), int(sum_number(rows))
    n_weight = xtx.shape[0] - (layer.bias is not None)
    before = _rel_error(_current(root, layer).to(xtx.device), xtx, xty, yy)
    theta = ridge_solve(xtx, xty, n_weight, ridge)
    after = _rel_error(theta, xtx, xty, yy)
    _write(root, layer, theta)
    log.debug("re-fit %s (%s): %d/%d inputs, %d outputs, %d rows, error %.4g -> %.4g", layer.node, layer.weight,
              layer.kept_in.size, layer.n_in, layer.kept_out.size, rows, before, after)
    return LayerFit(layer.node, layer.weight, layer.bias, layer.kind, int(layer.kept_in.size), layer.n_in,
                    int(layer.kept_out.size), rows, before, after)


def compensate(gm: torch.fx.GraphModule, c: Coupling, removed: np.ndarray, data: Iterable, *,
               max_batches: int | None = None, positions: int | None = 96, ridge: float = 1e-3,
               scope: str = "removed", seed: int = 0, progress: bool = True,
               reference: torch.fx.GraphModule | None = None,
               reference_outputs: Mapping[str, Sequence[int]] | None = None) -> Compensation:
    """Re-fit, in place in ``gm``, the kept weights of every layer that reads removed units.

    Args:
        gm: an analysed GraphModule (a private copy: its parameters are updated in place).
        c: its coupling (``gm.meta["oba.coupling"]``).
        removed: ``bool[n_units]``, the removed units.
        data: calibration batches ``(inputs, targets)`` or bare inputs; targets are not used.
        max_batches: use at most this many batches.
        positions: sampled output positions per image for convolutions (``None``: all).
        ridge: relative ridge (times the mean diagonal of ``XᵀX``); ``0`` for plain least squares.
        scope: ``"removed"``: layers reading removed units; ``"all"``: every conv / linear layer.
        seed: seed of the position sampling.
        progress: show a progress bar over the layers.
        reference: the dense network whose layer outputs are the targets (default: ``gm`` as it
            is on entry); its layers are found by weight name (:func:`retarget`). Lets a caller
            change ``gm`` first (e.g. re-estimate its BatchNorm statistics, or an earlier pruning
            step) and still fit to the original network.
        reference_outputs: ``{weight name: the reference output channel of each of gm's output
            channels}`` for layers that an earlier step already slimmed (see :func:`retarget`).

    Returns:
        The :class:`Compensation` record.
    """
    t0 = time.perf_counter()
    layers, skipped = find_layers(gm, c, removed, scope)
    if reference is not None:
        layers, lost = retarget(gm, layers, reference, reference_outputs)
        skipped += lost
    inputs, index = _batches(data, max_batches)
    images = int(sum_number(sum(int(_flat(x)[0].shape[0]) for x in inputs if _flat(x))))
    masked = masked_reference(gm, c, removed)
    todo = {l.node: l for l in layers}
    fits: list[LayerFit] = []
    bar = tqdm(total=len(layers), desc="compensation", unit="layer", disable=None if progress and is_main() else True,
               leave=False)
    ref = gm if reference is None else reference
    with eval_mode(ref), eval_mode(masked):
        dense, pruned = _Walk(ref, inputs), _Walk(masked, inputs)
        for node in masked.graph.nodes:
            layer = todo.get(node.name) if node.op in ("call_module", "call_function") else None
            if layer is not None:
                gens = [torch.Generator().manual_seed(seed * 1_000_003 + len(fits) * 10_007 + i) for i in index]
                fits.append(_fit(layer, masked, pruned.values(node.args[0]),
                                 dense.values(dense.until(layer.ref_node or node.name)), positions, ridge, gens))
                bar.update(1)
            assert pruned.step() is node
        out_p, out_d = pruned.finish(), dense.finish()
    bar.close()
    for layer in layers:  # the user's copy gets the re-fit weights
        for name in (layer.weight, layer.bias):
            if name is not None:
                with torch.no_grad():
                    _get(gm, name).copy_(_get(masked, name))
    rec = Compensation(tuple(fits), tuple(skipped), images, int(sum_number(len(inputs))), positions, ridge, seed, scope,
                       _output_error(out_p, out_d), time.perf_counter() - t0)
    log.info("compensation: re-fit %d layers (%d skipped) on %d images in %.1f s; output error vs dense %.3g",
             len(fits), len(skipped), images, rec.seconds, rec.output_rel_error)
    return rec


def _output_error(out_p: list, out_d: list) -> float:
    """``‖pruned − dense‖ / ‖dense‖`` over every output tensor; ``nan`` when the shapes differ
    (an output whose channels an earlier step removed, compared with the dense network's)."""
    pairs = [(a.double(), b.double()) for o, d in zip(out_p, out_d) for a, b in zip(_flat(o), _flat(d))]
    if any(a.shape != b.shape for a, b in pairs):
        return float("nan")
    num = sum_number(float(sum((a - b).square().sum() for a, b in pairs)))  # summed on the device, read once
    den = sum_number(float(sum(b.square().sum() for _, b in pairs)))
    return float(np.sqrt(num / den)) if den > 0 else 0.0
