"""Top-k eigenpairs of the loss Hessian by power iteration with exact Hessian-vector products.

CAMP-HiVe (arXiv 2511.06265) ranks weights by the dominant curvature directions of the loss.
:func:`power_iteration` finds them with the fused HVP of :mod:`oba_fx.hvp` (one dual forward and
one backward per batch and iteration, ``tangents=v``), on the Hessian of the **batch-averaged**
loss ``H = (1/B) Σ_b H_b`` over the calibration batches (``docs/design.md`` "CAMP-HiVe").

**The vector.** ``v`` spans every scored parameter at once (by default all trainable floating
parameters) and is normalised across all of them, ``Σ_tensors ‖v_t‖² = 1``; not per tensor.

**Deflation.** For ``k > 1`` the ``j``-th pair is the top pair of ``P H P`` with
``P = I − Σ_{i<j} v_i v_iᵀ`` (projection deflation: the iterate and each product are
orthogonalised against the pairs already found). For exact eigenvectors this has the same
remaining spectrum as Hotelling's ``H − Σ λ_i v_i v_iᵀ`` and it is more stable in floating point.
Power iteration converges to the eigenvalues of largest *magnitude*; the report says which.

**Masks.** ``masks={name: 0/1}`` restricts ``H`` to the unmasked coordinates
(``v ← m ⊙ v``, ``Hv ← m ⊙ Hv``): the curvature of the network that remains after pruning.

**Data parallel.** Under ``torch.distributed`` each rank holds its share of the calibration
batches (batch ``i`` on rank ``i mod world``); a product is the sum of every rank's per-batch
products (one ``all_reduce`` of the flattened vector) divided by the number of batches over all
ranks, so all ranks iterate on the same vectors and return the same eigenpairs.

**Convergence.** Iteration ``t`` of pair ``j`` computes ``w = P H P v_t``, the Rayleigh quotient
``λ = v_tᵀ w`` and the residual ``‖w − λ v_t‖``; it stops when that is at most ``tol · |λ| / 2`` or after
``iters`` products. Each earlier pair's error (mostly along the next eigenvector) leaks into the
later ones through ``P``, so the ``k`` vectors are finally rotated by Rayleigh–Ritz (the ``k × k``
problem ``Vᵀ H V``, ``k`` more products) and the reported residuals ``‖H v − λ v‖`` are on ``H``
itself; ``converged`` says whether each is at most ``tol · |λ|``.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    >>> r = power_iteration(m, data, k=2, iters=1000, tol=1e-5, hessian="full", progress=False)
    >>> all(r.converged), abs(r.eigenvalues[0]) >= abs(r.eigenvalues[1])
    (True, True)
    >>> round(float(sum(v.square().sum() for v in r.eigenvectors[0].values())), 6)
    1.0
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .batches import take, to_device
from .checks import LabelCheck, check_data, check_inputs_usable, check_model, split_batch
from .distributed import active, all_reduce_sum, is_main, shard, sum_number
from .hvp import LossFn, check_hessian, fused_hvp, trainable_param_names
from .errors import BadInputError, BadNameError

log = logging.getLogger(__name__)

Vec = dict[str, torch.Tensor]

#: each pair's iteration stops at this fraction of ``tol``, so that the residual on ``H`` after the
#: final Rayleigh–Ritz rotation (which can be slightly larger) still meets ``tol``
_INNER = 0.5


@dataclass(frozen=True)
class PowerIterationResult:
    """Top-k eigenpairs of the batch-averaged loss Hessian and how they converged.

    Attributes:
        eigenvalues: ``λ_1 .. λ_k`` (Rayleigh quotients), in the order found (decreasing ``|λ|``).
        eigenvectors: ``k`` dicts ``{name: tensor of the parameter's shape}``, each of unit norm
            across all parameters and orthogonal to the others.
        iterations: Hessian-vector products (each over every batch) spent on each pair, the
            final Rayleigh–Ritz product included.
        residuals: ``‖H v − λ v‖`` of each reported pair (on ``H``, not the deflated operator).
        converged: whether each pair met ``residual ≤ tol · |λ|`` within ``iters``.
        param_names: the parameters ``v`` spans.
        hessian: ``"functional"`` or ``"full"``.
        n_batches: calibration batches averaged.
        tol: the tolerance used.
        seconds: wall time.
    """

    eigenvalues: tuple[float, ...]
    eigenvectors: tuple[Vec, ...] = field(repr=False)
    iterations: tuple[int, ...]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    param_names: tuple[str, ...] = field(repr=False)
    hessian: str = "functional"
    n_batches: int = 0
    tol: float = 0.0
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensors).

        Example:
            >>> r = PowerIterationResult((2.0,), ({},), (3,), (1e-9,), (True,), ())
            >>> r.report()["pairs"][0]["relative_residual"]
            5e-10
        """
        pairs = [{"eigenvalue": lam, "iterations": it, "residual": res,
                  "relative_residual": res / abs(lam) if lam else float("inf"), "converged": ok}
                 for lam, it, res, ok in zip(self.eigenvalues, self.iterations, self.residuals, self.converged)]
        return {"k": len(pairs), "hessian": self.hessian, "n_batches": self.n_batches, "tol": self.tol,
                "n_params": int(sum(v.numel() for v in self.eigenvectors[0].values())) if self.eigenvectors else 0,
                "hvp_products": int(sum(self.iterations)), "seconds": round(self.seconds, 3), "pairs": pairs}


# ------------------------------------------------------------------------------ vector algebra
def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def _axpy(alpha: torch.Tensor | float, x: Vec, y: Vec) -> Vec:
    """``y + alpha x``."""
    return {n: y[n] + alpha * x[n] for n in y}


def _scale(alpha: torch.Tensor | float, x: Vec) -> Vec:
    return {n: alpha * t for n, t in x.items()}


def _norm(a: Vec) -> torch.Tensor:
    return _dot(a, a).sqrt()


def _project_out(v: Vec, basis: Sequence[Vec]) -> Vec:
    """``v`` minus its components along the (orthonormal) ``basis``; twice, for round-off."""
    for _ in range(2):
        for b in basis:
            v = _axpy(-_dot(b, v), b, v)
    return v


def _masked(v: Vec, masks: Mapping[str, torch.Tensor]) -> Vec:
    return {n: t * masks[n] if n in masks else t for n, t in v.items()}


# ------------------------------------------------------------------------------ the operator
class _BatchHessian:
    """``v ↦ m ⊙ (1/B) Σ_b H_b (m ⊙ v)`` over fixed calibration batches.

    Products use the fused HVP. If a kernel of the model has no forward-mode derivative of its
    backward (``aten::hardsigmoid_backward`` in torch 2.14.1, used by hardswish and SE gates), they
    run with those activations written as clamps (:func:`hard_activations_decomposed`, the same
    function), and failing that by reverse-over-reverse (:func:`double_backward_hvp`).
    """

    def __init__(self, model: nn.Module, batches: list, names: list[str], loss_fn: LossFn | None, hessian: str,
                 masks: Mapping[str, torch.Tensor], n_total: int | None = None):
        self.model, self.batches, self.names = model, batches, names
        self.n_total = len(batches) if n_total is None else n_total  # batches over all ranks
        self.loss_fn, self.hessian, self.masks = loss_fn, hessian, masks
        self.decompose = False
        self.reverse = False

    def _one(self, x: Any, y: Any, v: Vec) -> Vec:
        if self.reverse:
            with hard_activations_decomposed():
                return double_backward_hvp(self.model, x, y, self.names, v, self.loss_fn, self.hessian)
        try:
            with hard_activations_decomposed() if self.decompose else contextlib.nullcontext():
                return fused_hvp(self.model, (x, y), param_names=self.names, loss_fn=self.loss_fn,
                                 hessian=self.hessian, tangents=v).hvps
        except NotImplementedError as e:
            if "forward AD" not in str(e):
                raise
            if not self.decompose:
                log.warning("the fused HVP has no forward-mode rule for a kernel of this model (%s); running "
                            "hardsigmoid / hardswish as clamps (same function)", e)
                self.decompose = True
            else:
                log.warning("the fused HVP cannot run on this model (%s); using double backward instead", e)
                self.reverse = True
            return self._one(x, y, v)

    def __call__(self, v: Vec) -> Vec:
        v = _masked(v, self.masks)
        total = {n: torch.zeros_like(t) for n, t in v.items()}
        for x, y in self.batches:  # this rank's share; the other ranks' products are added below
            hv = self._one(x, y, v)
            total = {n: total[n] + hv[n] for n in total}
        total = _all_reduce(total)
        return _masked(_scale(1.0 / self.n_total, total), self.masks)


def _all_reduce(v: Vec) -> Vec:
    """``v`` summed over the ranks, flattened into one collective (identity on one process)."""
    if not active():
        return v
    flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in v.values()]))
    out, i = {}, 0
    for n, t in v.items():
        out[n] = flat[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


class hard_activations_decomposed(TorchFunctionMode):
    """Within this context ``F.hardsigmoid`` and ``F.hardswish`` (also as ``nn.Hardsigmoid`` /
    ``nn.Hardswish``) run as ``clamp(x + 3, 0, 6) / 6`` and ``x · clamp(x + 3, 0, 6) / 6``: the same
    functions (and derivatives almost everywhere), built from kernels whose backward has forward-mode
    and second derivatives.

    Example:
        >>> x = torch.linspace(-5, 5, 11)
        >>> with hard_activations_decomposed():
        ...     a = torch.nn.functional.hardswish(x)
        >>> torch.allclose(a, torch.nn.functional.hardswish(x))
        True
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            return (args[0] + 3).clamp(0, 6) / 6
        if func is F.hardswish:
            return args[0] * ((args[0] + 3).clamp(0, 6) / 6)
        return func(*args, **kwargs)


def double_backward_hvp(model: nn.Module, x: Any, y: Any, names: Sequence[str], v: Mapping[str, torch.Tensor],
                        loss_fn: LossFn | None = None, hessian: str = "full") -> Vec:
    """``H v`` (``hessian="full"``) or ``H_F v`` (``"functional"``: ``∂ℓ/∂z`` held fixed) of one
    batch by reverse-over-reverse: ``∇_θ ⟨∇_θ f, v⟩`` with ``f = ℓ(z)`` or ``⟨stopgrad(∂ℓ/∂z), z⟩``.
    Buffers are copied and the model is not changed.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
        >>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> v = {n: torch.ones_like(p) for n, p in m.named_parameters()}
        >>> a = double_backward_hvp(m, x, y, list(v), v, hessian="functional")
        >>> b = fused_hvp(m, (x, y), hessian="functional", tangents=v).hvps
        >>> all(torch.allclose(a[n], b[n]) for n in v)
        True
    """
    from torch.func import functional_call

    from .hvp import default_loss_fn

    loss_fn = loss_fn or default_loss_fn
    params = {n: p.detach() for n, p in model.named_parameters()}
    leaves = {n: params[n].clone().requires_grad_() for n in names}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        z = functional_call(model, ({**params, **leaves}, bufs), (x,))
        loss = loss_fn(z, y)
        if hessian == "functional":
            (c,) = torch.autograd.grad(loss, z, retain_graph=True)
            loss = (c.detach() * z).sum()
        gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        dot = sum((g * v[n]).sum() for n, g in zip(names, gs) if g is not None and g.requires_grad)
        if not isinstance(dot, torch.Tensor):  # no curvature reaches any parameter
            return {n: torch.zeros_like(params[n]) for n in names}
        hv = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(params[n]) if h is None else h.detach() for n, h in zip(names, hv)}


def _random_unit(params: Mapping[str, torch.Tensor], gen: torch.Generator, masks: Mapping[str, torch.Tensor],
                 basis: Sequence[Vec]) -> Vec:
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for n, p in params.items()}
    v = _project_out(_masked(v, masks), basis)
    return _scale(1.0 / _norm(v), v)


def _one_pair(op: _BatchHessian, v: Vec, basis: Sequence[Vec], iters: int, tol: float, bar: Any,
              j: int) -> tuple[float, Vec, int, float, bool]:
    """Power iteration on ``P H P`` from the unit vector ``v`` (orthogonal to ``basis``); the
    residual here is that of the deflated operator."""
    lam, res = 0.0, float("inf")
    for t in range(1, iters + 1):
        w = _project_out(op(v), basis)
        lam_t = _dot(v, w)
        res = float(_norm(_axpy(-lam_t, v, w)))
        lam = float(lam_t)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(pair=j + 1, eig=f"{lam:.4g}", rel_res=f"{res / max(abs(lam), 1e-300):.2e}")
        if res <= _INNER * tol * abs(lam):
            return lam, v, t, res, True
        nw = _norm(w)
        if float(nw) == 0.0:  # v is in the null space of the deflated operator
            return lam, v, t, res, res == 0.0
        v = _scale(1.0 / nw, w)
    return lam, v, iters, res, False


def _rayleigh_ritz(op: _BatchHessian, vectors: list[Vec]) -> tuple[list[float], list[Vec], list[float]]:
    """Best pairs of ``H`` in the span of the (orthonormal) ``vectors``: ``k`` more products.

    Deflation leaves each pair with a component along the earlier ones of the size of their own
    error; the ``k × k`` projected eigenproblem ``Vᵀ H V`` removes it. Returns eigenvalues
    (decreasing ``|λ|``), vectors and residuals ``‖H u − λ u‖`` on ``H`` itself.
    """
    hv = [op(v) for v in vectors]
    k = len(vectors)
    T = torch.stack([torch.stack([_dot(vectors[i], hv[j]) for j in range(k)]) for i in range(k)]).double().cpu()
    evals, Q = torch.linalg.eigh((T + T.T) / 2)
    order = evals.abs().argsort(descending=True)
    lams, us, res = [], [], []
    for c in order.tolist():
        u = hu = None
        for i in range(k):
            q = float(Q[i, c])
            u = _scale(q, vectors[i]) if u is None else _axpy(q, vectors[i], u)
            hu = _scale(q, hv[i]) if hu is None else _axpy(q, hv[i], hu)
        lam = float(evals[c])
        lams.append(lam)
        us.append(u)
        res.append(float(_norm(_axpy(-lam, u, hu))))
    return lams, us, res


def _check_masks(masks: Mapping[str, torch.Tensor] | None, params: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for n, m in (masks or {}).items():
        if n not in params:
            raise BadNameError(f"masks: {n!r} is not one of the parameters power iteration spans "
                               f"(e.g. {list(params)[:4]}); pass param_names= to include it")
        if tuple(m.shape) != tuple(params[n].shape):
            raise BadInputError(f"masks[{n!r}] has shape {tuple(m.shape)}, the parameter {tuple(params[n].shape)}")
        out[n] = m.to(device=params[n].device, dtype=params[n].dtype)
    return out


def _batches(data: Iterable, max_batches: int | None, device: torch.device,
             labels: LabelCheck) -> tuple[list, int]:
    """This rank's share of the calibration batches (on ``device``) and the number over all ranks."""
    if data is None:
        raise BadInputError("power_iteration needs calibration data: data=<iterable of (inputs, targets)>")
    out = []
    for i, b in shard(enumerate(take(data, max_batches))):
        x, y = (to_device(t, device) for t in split_batch(b, f"calibration batch {i}"))
        check_inputs_usable(x, f"calibration batch {i}")
        labels(x, y, f"calibration batch {i}")
        out.append((x, y))
    n = int(sum_number(len(out)))
    if not n:
        raise BadInputError("no batches: `data` yielded nothing (or max_batches=0)")
    return out, n


def power_iteration(model: nn.Module, data: Iterable, *, k: int = 1, iters: int = 100, tol: float = 1e-4,
                    seed: int = 0, hessian: str = "full", loss_fn: LossFn | None = None,
                    param_names: Sequence[str] | None = None, masks: Mapping[str, torch.Tensor] | None = None,
                    max_batches: int | None = None, mode: str = "eval",
                    progress: bool = True) -> PowerIterationResult:
    """The ``k`` eigenpairs of largest ``|λ|`` of the batch-averaged loss Hessian.

    Args:
        model: returns logits; never mutated (buffers are copied, modes restored).
        data: calibration batches ``(x, y)``; all are held for the run (each product visits all).
            Under ``torch.distributed`` each rank holds and multiplies its share (batch ``i`` on rank
            ``i mod world``) and the products are summed over the ranks, so every rank iterates on the
            same vectors and returns the same eigenpairs.
        k: number of eigenpairs (deflation for ``k > 1``).
        iters: the most Hessian-vector products per pair.
        tol: stop when ``‖Hv − λv‖ ≤ tol · |λ|``.
        seed: seeds the random start vectors (float64 normal draws, then cast).
        hessian: ``"full"`` (``H``, default) or ``"functional"`` (``H_F``, see
            ``docs/design.md`` "Which Hessian").
        loss_fn: ``loss_fn(logits, y) -> scalar``; default mean cross-entropy.
        param_names: the parameters ``v`` spans; default every trainable floating parameter.
        masks: ``{name: 0/1 tensor}``: restrict ``H`` to the unmasked coordinates.
        max_batches: use at most this many batches.
        mode: ``"eval"`` (default), ``"train"`` or ``"keep"`` (as :func:`oba_fx.score`).
        progress: a tqdm bar over products.

    Returns:
        :class:`PowerIterationResult` (``.report()`` for a JSON summary).

    Raises:
        BadInputError: (a ``ValueError``) ``k`` or ``iters`` not positive, unknown ``hessian`` or
            ``mode``, no batches, a mask of the wrong shape, labels that do not fit the logits.
        BadNameError: (a ``KeyError``) a name in ``param_names`` or ``masks`` that is not a
            parameter of the model.
        BadTypeError: (a ``TypeError``) ``model`` is not an ``nn.Module``; ``data`` is a bare
            tensor or its batches are not ``(inputs, targets)`` pairs.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2).double()
        >>> power_iteration(m, [(torch.randn(4, 2).double(), torch.tensor([0, 1, 1, 0]))], k=0)
        Traceback (most recent call last):
        ...
        oba_fx.errors.BadInputError: k must be a positive integer (the number of eigenpairs), got 0
    """
    from .scoring import MODES, _scoring_mode

    if int(k) != k or k < 1:
        raise BadInputError(f"k must be a positive integer (the number of eigenpairs), got {k}")
    if int(iters) != iters or iters < 1:
        raise BadInputError(f"iters must be a positive integer, got {iters}")
    check_hessian(hessian)
    if mode not in MODES:
        raise BadInputError(f"unknown mode {mode!r}; expected one of {MODES}")
    check_model(model, "power_iteration", traced=False)
    check_data(data, "power_iteration")
    names = list(param_names) if param_names is not None else trainable_param_names(model)
    all_params = dict(model.named_parameters())
    missing = [n for n in names if n not in all_params]
    if missing:
        raise BadNameError(f"param_names: not parameters of the model: {missing[:5]}")
    params = {n: all_params[n].detach() for n in names}
    masks_ = _check_masks(masks, params)
    device = next(iter(params.values())).device
    batches, n_batches = _batches(data, max_batches, device, LabelCheck(model, enabled=loss_fn is None))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    op = _BatchHessian(model, batches, names, loss_fn, hessian, masks_, n_batches)
    found: list[tuple[float, Vec, int, float, bool]] = []
    bar = None
    if progress and is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=k * iters, desc="power iteration", unit="hvp", disable=None, leave=False)
    try:
        with _scoring_mode(model, mode):
            for j in range(k):
                basis = [f[1] for f in found]
                v0 = _random_unit(params, gen, masks_, basis)
                found.append(_one_pair(op, v0, basis, int(iters), tol, bar, j))
                log.info("eigenpair %d/%d: λ=%.6g after %d products, residual %.3g (%s)", j + 1, k, found[-1][0],
                         found[-1][2], found[-1][3], "converged" if found[-1][4] else "NOT converged")
    finally:
        if bar is not None:
            bar.close()
    with _scoring_mode(model, mode):
        lams, vecs, res = _rayleigh_ritz(op, [f[1] for f in found])
    ok = tuple(r <= tol * abs(lam) for r, lam in zip(res, lams))
    log.info("Rayleigh-Ritz on the %d vectors: eigenvalues %s, relative residuals %s", k,
             [f"{lam:.6g}" for lam in lams], [f"{r / max(abs(lam), 1e-300):.2e}" for r, lam in zip(res, lams)])
    return PowerIterationResult(
        eigenvalues=tuple(lams), eigenvectors=tuple(vecs), iterations=tuple(f[2] + 1 for f in found),
        residuals=tuple(res), converged=ok, param_names=tuple(names), hessian=hessian,
        n_batches=n_batches, tol=tol, seconds=time.time() - t0)


__all__ = ["power_iteration", "PowerIterationResult", "double_backward_hvp", "hard_activations_decomposed"]
