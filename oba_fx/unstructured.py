"""Unstructured pruning with masks that hold: :func:`prune_unstructured`.

Every weight of a convolution or linear layer (every floating parameter with two or more dims)
is a candidate. A criterion gives each one an importance; the lowest go, under one of three
scopes:

* ``"global"``: one threshold over all candidate weights (each tensor keeps at least one);
* ``"layer"``: every tensor loses the same fraction;
* ``"adaptive"`` (``criterion="camp"`` only): CAMP-HiVe's curvature-adaptive thresholds. A
  tensor's curvature density is its share of the weighted top-eigenvector mass
  (:func:`oba_fx.criteria.camp.curvature_share`) divided by its size, relative to the average
  density ``r_l``; its pruning fraction is ``p_l = clip(a · r_l^(−β), lo, hi)`` with ``a`` found by
  bisection so that the fractions add up to the target (:func:`adaptive_fractions`). Flat
  (low-curvature) layers lose more, sharp ones less, within the caps.

Importance: ``"camp"`` ``Σ_j w_j |v_j| · |θ|`` (``times_theta=False``: the paper's ``Σ_j w_j |v_j|``;
:mod:`oba_fx.criteria.camp`, options ``k``, ``weighting``, ``times_theta``), ``"oba"`` ``|θ ⊙ Hθ|``, ``"taylor"`` ``|θ ⊙ g|`` (both averaged
over batches before the absolute value, as :func:`oba_fx.score`), ``"l1"``/``"magnitude"``
``|θ|``; any other registered criterion is used through :func:`oba_fx.score` the same way.

With ``steps > 1`` the sparsity after step ``t`` of ``T`` is ``1 − (1 − s)^{t/T}``, and every step
re-estimates the importance (for ``"camp"``: power iteration on the curvature of the weights
that remain, :func:`oba_fx.power_iteration` with ``masks``) and the adaptive thresholds: the
paper's dynamic schedule. Pruned weights stay pruned.

**Merging** (``merge=True``): before being zeroed, each pruned weight gives ``merge_fraction``
of its value to a kept partner of its tensor, chosen cyclically (:func:`oba_fx.merging.merge_unstructured`).

**Masks.** The result is a ``torch.fx.GraphModule`` whose pruned tensors carry a
``torch.nn.utils.parametrize`` parametrization :class:`WeightMask`: ``weight = original ⊙ mask``,
so an optimizer cannot regrow a pruned weight (its gradient is masked too, and the original
entry is zero), ``torch.compile`` traces the product, and :func:`oba_fx.save` / :func:`oba_fx.load`
store and re-apply the masks. :func:`make_masks_permanent` removes the parametrizations, leaving
plain (zero-filled) weights. The report ``gm.meta["oba"]`` has each tensor's and the total sparsity
(:func:`sparsity_report`).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> gm = prune_unstructured(m, None, criterion="l1", sparsity=0.75, progress=False)
    >>> gm.meta["oba"]["total"]["sparsity"]
    0.75
    >>> float((gm.get_submodule("0").weight == 0).float().mean()) >= 0.5
    True
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils import parametrize

from .batches import take
from .criteria import get_criterion
from .criteria.camp import WEIGHTINGS, camp_importance, curvature_share
from .merging import merge_unstructured
from .hessian_eigen import PowerIterationResult, power_iteration
from .tracing import trace
from .checks import check_data, check_model
from .errors import BadInputError, BadNameError

log = logging.getLogger(__name__)

#: the thresholding scopes
SCOPES = ("global", "layer", "adaptive")
#: criterion aliases
_ALIASES = {"magnitude": "l1"}


class WeightMask(nn.Module):
    """The parametrization ``weight = original ⊙ mask`` (``mask`` a bool buffer; masked entries
    are exact ``+0.0``).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> _ = apply_masks(lin, {"weight": torch.tensor([[True, False], [False, True]])})
        >>> lin.weight[0, 1].item(), isinstance(lin.parametrizations.weight[0], WeightMask)
        (0.0, True)
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.masked_fill(~self.mask, 0.0)


def prunable_weights(model: nn.Module) -> list[str]:
    """Names of the floating parameters with two or more dims (conv / linear weights).

    Example:
        >>> prunable_weights(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)))
        ['0.weight']
    """
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2]


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Register a :class:`WeightMask` on each named parameter (in place) and zero the masked
    entries of the original; returns ``model``.

    Raises:
        KeyError: a name that is not a parameter. ValueError: a mask of the wrong shape, or a
        parameter that already has a parametrization.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise BadNameError(f"mask for {name!r}, which is not a parameter of the model (e.g. {list(params)[:4]})")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise BadInputError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        mod_name, attr = _split(name)
        mod = model.get_submodule(mod_name)
        if parametrize.is_parametrized(mod, attr):
            raise BadInputError(f"{name!r} already has a parametrization; call make_masks_permanent(model) first")
        m = mask.to(device=p.device).bool()
        p.masked_fill_(~m, 0.0)
        parametrize.register_parametrization(mod, attr, WeightMask(m))
    return model


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of every :class:`WeightMask` on ``model``.

    Example:
        >>> lin = apply_masks(torch.nn.Linear(2, 1), {"weight": torch.tensor([[True, False]])})
        >>> masks_of(lin)
        {'weight': tensor([[ True, False]])}
    """
    out = {}
    for mod_name, mod in model.named_modules():
        plist = getattr(mod, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        for attr, chain in plist.items():
            for p in chain:
                if isinstance(p, WeightMask):
                    out[f"{mod_name}.{attr}" if mod_name else attr] = p.mask.clone()
    return out


def make_masks_permanent(model: nn.Module) -> nn.Module:
    """Remove every :class:`WeightMask` (in place), leaving plain parameters with the zeros
    written in; returns ``model``. Afterwards nothing stops an optimizer from regrowing them.

    Unlike ``parametrize.remove_parametrizations``, this never edits the parametrized class
    itself, which ``copy.deepcopy`` shares between copies (removing the property there would
    break every other copy).

    Example:
        >>> lin = apply_masks(torch.nn.Linear(2, 1), {"weight": torch.tensor([[True, False]])})
        >>> lin = make_masks_permanent(lin)
        >>> parametrize.is_parametrized(lin), lin.weight[0, 1].item()
        (False, 0.0)
    """
    for name in list(masks_of(model)):
        mod_name, attr = _split(name)
        _unparametrize(model.get_submodule(mod_name), attr)
    return model


def _unparametrize(mod: nn.Module, attr: str) -> None:
    chain = mod.parametrizations[attr]
    if len(mod.parametrizations) != 1 or len(chain) != 1:
        raise BadInputError(f"{type(mod).__name__} carries parametrizations besides one WeightMask on {attr!r} "
                         f"({list(mod.parametrizations)}); remove them with torch.nn.utils.parametrize first")
    with torch.no_grad():
        value = getattr(mod, attr).detach().clone()
    requires_grad = chain.original.requires_grad
    del mod._modules["parametrizations"]
    mod.__class__ = type(mod).__bases__[0]  # the class before parametrization; the shared one is untouched
    mod.register_parameter(attr, nn.Parameter(value, requires_grad=requires_grad))


def unmasked_copy(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A deep copy without masks (masked weights as zeros) and the masks: what
    :func:`oba_fx.save` stores, since torch cannot pickle a parametrized module.

    Example:
        >>> lin = apply_masks(torch.nn.Linear(2, 1), {"weight": torch.tensor([[True, False]])})
        >>> plain, masks = unmasked_copy(lin)
        >>> type(plain).__name__, type(lin).__name__, list(masks)
        ('Linear', 'ParametrizedLinear', ['weight'])
    """
    masks = masks_of(model)
    return make_masks_permanent(copy.deepcopy(model)), masks


def sparsity_report(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Zeros per tensor and in total, over ``names`` (default: :func:`prunable_weights`).

    Example:
        >>> lin = apply_masks(torch.nn.Linear(2, 2), {"weight": torch.tensor([[True, False], [False, False]])})
        >>> sparsity_report(lin)["total"]
        {'numel': 4, 'zeros': 3, 'sparsity': 0.75}
    """
    names = list(names) if names is not None else _prunable_names(model)
    layers, nz, nn_ = {}, 0, 0
    for n in names:
        w = _weight(model, n)
        z = int((w == 0).sum())
        layers[n] = {"numel": w.numel(), "zeros": z, "sparsity": round(z / max(w.numel(), 1), 6)}
        nz, nn_ = nz + z, nn_ + w.numel()
    return {"layers": layers, "total": {"numel": nn_, "zeros": nz, "sparsity": round(nz / max(nn_, 1), 6)}}


def _prunable_names(model: nn.Module) -> list[str]:
    """Prunable weights by their public names (``conv.weight``, not a parametrization's ``original``)."""
    plain = [n for n in prunable_weights(model) if "parametrizations" not in n.split(".")]
    return plain + [n for n in masks_of(model) if n not in plain]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, attr = _split(name)
    return getattr(model.get_submodule(mod_name), attr).detach()


# ------------------------------------------------------------------------------ thresholds
def adaptive_fractions(share: Mapping[str, float], sizes: Mapping[str, int], sparsity: float,
                       caps: tuple[float, float] | None = None, beta: float = 0.5,
                       floor: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-tensor pruning fractions from curvature shares (see the module docstring).

    Args:
        share: ``{name: curvature share}`` (any non-negative scale).
        sizes: ``{name: number of weights}``.
        sparsity: the overall fraction to remove.
        caps: ``(lo, hi)``; default ``(sparsity / 2, (1 + sparsity) / 2)``.
        beta: how strongly curvature moves the fraction (0: every layer gets ``sparsity``).
        floor: per-tensor lower bounds (the fraction already pruned, in a multi-step run).

    Returns:
        ``{name: fraction}`` with ``Σ fraction · size ≈ sparsity · Σ size``.

    Example:
        >>> f = adaptive_fractions({"flat": 0.1, "sharp": 0.9}, {"flat": 100, "sharp": 100}, 0.5)
        >>> f["flat"] > 0.5 > f["sharp"], round(f["flat"] + f["sharp"], 6)
        (True, 1.0)
    """
    if not 0.0 <= sparsity < 1.0:
        raise BadInputError(f"sparsity must be in [0, 1), got {sparsity}")
    lo, hi = caps if caps is not None else (sparsity / 2, (1 + sparsity) / 2)
    if not 0.0 <= lo <= sparsity <= hi < 1.0:
        raise BadInputError(f"caps must satisfy 0 <= lo <= sparsity <= hi < 1, got caps={caps} for sparsity {sparsity}")
    names = list(sizes)
    n_all = sum(sizes.values())
    total_share = sum(max(share.get(n, 0.0), 0.0) for n in names)
    mean_density = total_share / n_all if n_all else 0.0
    floor = floor or {}
    lo_n = {n: min(max(lo, floor.get(n, 0.0)), hi) for n in names}

    def rel(n: str) -> float:
        d = max(share.get(n, 0.0), 0.0) / sizes[n]
        return math.inf if d == 0.0 or mean_density == 0.0 else (mean_density / d) ** beta

    r = {n: rel(n) for n in names}

    def fractions(a: float) -> dict[str, float]:
        return {n: min(max(a * r[n], lo_n[n]), hi) for n in names}

    def removed(a: float) -> float:
        return sum(f * sizes[n] for n, f in fractions(a).items())

    target = sparsity * n_all
    a_lo, a_hi = 0.0, 1.0
    while removed(a_hi) < target and a_hi < 1e12:
        a_hi *= 2
    for _ in range(100):
        mid = (a_lo + a_hi) / 2
        if removed(mid) < target:
            a_lo = mid
        else:
            a_hi = mid
    return fractions(a_hi)


def _select(importance: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor], sparsity: float, scope: str,
            fractions: Mapping[str, float] | None) -> dict[str, torch.Tensor]:
    """New keep masks: remove the lowest-importance kept weights until ``sparsity`` (already
    pruned ones stay pruned; each tensor keeps at least one weight)."""
    out = {}
    if scope == "global":
        names = list(importance)
        flat = torch.cat([importance[n].detach().double().reshape(-1).cpu().masked_fill(~keep[n].reshape(-1).cpu(),
                                                                                        -math.inf) for n in names])
        n_total = flat.numel()
        n_prune = int(round(sparsity * n_total)) - int(sum(int((~keep[n]).sum()) for n in names))
        # protect each tensor's best kept weight
        protect = torch.zeros(n_total, dtype=torch.bool)
        off = 0
        for n in names:
            k = importance[n].numel()
            protect[off + int(flat[off:off + k].argmax())] = True
            off += k
        cand = flat.masked_fill(protect, math.inf)
        new_keep = torch.cat([keep[n].reshape(-1).cpu() for n in names]).clone()
        if n_prune > 0:
            order = torch.argsort(cand, stable=True)
            already = int((~new_keep).sum())
            new_keep[order[already:already + n_prune]] = False
        off = 0
        for n in names:
            k = importance[n].numel()
            out[n] = new_keep[off:off + k].view_as(keep[n]).to(keep[n].device)
            off += k
        return out
    for n, imp in importance.items():
        frac = sparsity if scope == "layer" else fractions[n]
        numel = imp.numel()
        n_prune = min(int(round(frac * numel)), numel - 1) - int((~keep[n]).sum())
        kf = keep[n].reshape(-1).clone()
        if n_prune > 0:
            s = imp.detach().double().reshape(-1).masked_fill(~kf, -math.inf)
            kf[torch.argsort(s, stable=True)[int((~kf).sum()):int((~kf).sum()) + n_prune]] = False
        out[n] = kf.view_as(keep[n])
    return out


# ------------------------------------------------------------------------------ importance
def _importance(gm: nn.Module, data: list | None, criterion: str, names: list[str], keep: Mapping[str, torch.Tensor],
                opts: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(importance of each candidate weight, curvature shares or None, power-iteration report or None)."""
    if criterion == "camp":
        masks = {n: keep[n] for n in names}
        r = power_iteration(gm, data, k=opts["k"], iters=opts["iters"], tol=opts["tol"], seed=opts["seed"],
                            hessian=opts["hessian"], loss_fn=opts["loss_fn"], masks=masks, progress=opts["progress"])
        params = {n: p.detach() for n, p in gm.named_parameters()}
        imp = camp_importance(r, params, weighting=opts["weighting"], times_theta=opts["times_theta"])
        share = curvature_share(r, opts["weighting"])
        return {n: imp[n] for n in names}, {n: share[n] for n in names}, r.report()
    from .scoring import score

    s = score(gm, data, criterion=criterion, hessian=opts["hessian"], loss_fn=opts["loss_fn"], seed=opts["seed"],
              progress=opts["progress"])
    return {n: s[n].abs() for n in names}, None, None


def _from_precomputed(pre: Any, gm: nn.Module, criterion: str, names: list[str], opts: Mapping[str, Any]):
    if isinstance(pre, PowerIterationResult):
        if criterion != "camp":
            raise BadInputError(f"precomputed power-iteration result given for criterion {criterion!r}; it serves 'camp'")
        params = {n: p.detach() for n, p in gm.named_parameters()}
        imp = camp_importance(pre, params, weighting=opts["weighting"], times_theta=opts["times_theta"])
        share = curvature_share(pre, opts["weighting"])
        return {n: imp[n] for n in names}, {n: share[n] for n in names}, pre.report()
    if criterion == "camp":
        raise BadInputError("criterion 'camp' takes precomputed=<PowerIterationResult from oba_fx.power_iteration>")
    missing = [n for n in names if n not in pre]
    if missing:
        raise BadNameError(f"precomputed scores lack {missing[:4]}")
    return {n: pre[n].abs() for n in names}, None, None


@torch.no_grad()
def _zero_or_merge(gm: nn.Module, keep: Mapping[str, torch.Tensor], merge: bool, fraction: float) -> None:
    params = dict(gm.named_parameters())
    if merge:
        merged = merge_unstructured({n: params[n] for n in keep}, keep, fraction)
        for n, w in merged.items():
            params[n].copy_(w)
    else:
        for n, k in keep.items():
            params[n].masked_fill_(~k, 0.0)


def _check(criterion: str, sparsity: float, scope: str, steps: int, weighting: str, merge_fraction: float) -> str:
    criterion = _ALIASES.get(criterion, criterion)
    get_criterion(criterion)
    if not 0.0 <= sparsity < 1.0:
        raise BadInputError(f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity}")
    if scope not in SCOPES:
        raise BadInputError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if scope == "adaptive" and criterion != "camp":
        raise BadInputError("scope='adaptive' sets per-layer fractions from the Hessian eigenvectors: it needs "
                         f"criterion='camp' (got {criterion!r}); use scope='global' or 'layer'")
    if int(steps) != steps or steps < 1:
        raise BadInputError(f"steps must be a positive integer, got {steps}")
    if weighting not in WEIGHTINGS:
        raise BadInputError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not 0.0 <= merge_fraction <= 1.0:
        raise BadInputError(f"merge_fraction must be in [0, 1], got {merge_fraction}")
    return criterion


def prune_unstructured(model: nn.Module, data: Iterable | None, *, criterion: str = "camp", sparsity: float,
                       scope: str = "global", merge: bool = False, merge_fraction: float = 0.5, steps: int = 1,
                       hessian: str = "full", k: int = 1, iters: int = 30, tol: float = 1e-3,
                       weighting: str = "lambda", times_theta: bool = True, caps: tuple[float, float] | None = None,
                       beta: float = 0.5, loss_fn: Callable | None = None, max_batches: int | None = None,
                       seed: int = 0, progress: bool = True,
                       precomputed: PowerIterationResult | Mapping[str, torch.Tensor] | None = None
                       ) -> torch.fx.GraphModule:
    """Remove a fraction of the individual conv / linear weights; masks hold them at zero.

    Args:
        model: the network (never modified: a traced copy is pruned).
        data: calibration batches ``(x, y)`` (``None`` for ``"l1"``/``"magnitude"``).
        criterion: ``"camp"``, ``"oba"``, ``"taylor"``, ``"l1"`` (alias ``"magnitude"``) or any
            registered criterion; importance is the absolute value of its score.
        sparsity: fraction of the candidate weights removed, in [0, 1).
        scope: ``"global"``, ``"layer"`` or ``"adaptive"`` (camp; see the module docstring).
        merge: cyclic pair merging before zeroing (:func:`oba_fx.merging.merge_unstructured`).
        merge_fraction: share of a pruned value given to its partner (default ½).
        steps: pruning steps on the exponential schedule, re-estimating importance and
            thresholds in between.
        hessian: ``"full"`` (default) or ``"functional"``, for ``"camp"`` and ``"oba"``.
        k, iters, tol: power iteration (``"camp"``): eigenpairs, most products per pair, tolerance.
        weighting: ``"lambda"`` or ``"uniform"``: combining ``k > 1`` eigenvectors.
        times_theta: camp importance ``Σ w_j |v_j| · |θ|`` (default, measured better) instead of
            the paper's ``Σ w_j |v_j|``.
        caps: ``(lo, hi)`` per-layer fraction bounds of ``"adaptive"``.
        beta: exponent of ``"adaptive"`` (0: uniform fractions).
        loss_fn: ``loss_fn(logits, y)``; default mean cross-entropy.
        max_batches: use at most this many calibration batches.
        seed: power-iteration start vectors, ``"random"``.
        progress: progress bars.
        precomputed: the first step's input, computed once and shared by several calls (e.g. one
            per sparsity): a :class:`~oba_fx.hessian_eigen.PowerIterationResult` of ``model`` for
            ``"camp"``, or ``{name: score}`` from :func:`oba_fx.score` for the other criteria. Later
            steps always recompute.

    Returns:
        A ``torch.fx.GraphModule`` with :class:`WeightMask` parametrizations; ``gm.meta["oba"]``
        holds the report (``layers``, ``total``, settings, power-iteration reports, seconds).

    Raises:
        BadInputError: (a ``ValueError``) bad ``sparsity``, ``scope``, ``steps``, ``weighting``; a
            data-driven criterion without data; labels that do not fit the logits; a model on the
            meta device or with non-finite weights. oba_fx.criteria.UnknownCriterionError:
            unknown criterion.
        BadTypeError: (a ``TypeError``) ``model`` is not an ``nn.Module`` or is TorchScript;
            ``data`` is a bare tensor.
    """
    criterion = _check(criterion, sparsity, scope, steps, weighting, merge_fraction)
    crit = get_criterion(criterion)
    check_model(model, "prune_unstructured")
    check_data(data, "prune_unstructured")
    batches = list(take(data, max_batches)) if data is not None else None
    if crit.needs_data and not batches and (precomputed is None or steps > 1):
        raise BadInputError(f"criterion {criterion!r} needs calibration data: pass data=<iterable of (inputs, targets)>")
    t0 = time.time()
    gm = trace(model)
    gm.train(model.training)
    names = prunable_weights(gm)
    params = dict(gm.named_parameters())
    keep = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    opts = dict(k=k, iters=iters, tol=tol, seed=seed, hessian=hessian, loss_fn=loss_fn, weighting=weighting,
                times_theta=times_theta, progress=progress)
    sizes = {n: params[n].numel() for n in names}
    pi_reports = []
    for t in range(1, int(steps) + 1):
        s_t = 1.0 - (1.0 - sparsity) ** (t / steps)
        if t == 1 and precomputed is not None:
            imp, share, rep = _from_precomputed(precomputed, gm, criterion, names, opts)
        else:
            imp, share, rep = _importance(gm, batches, criterion, names, keep, opts)
        fractions = None
        if scope == "adaptive":
            floor = {n: float((~keep[n]).sum()) / sizes[n] for n in names}
            fractions = adaptive_fractions(share, sizes, s_t, caps, beta, floor)
        keep = _select(imp, keep, s_t, scope, fractions)
        _zero_or_merge(gm, keep, merge, merge_fraction)
        if rep is not None:
            pi_reports.append(rep)
        log.info("unstructured step %d/%d: sparsity %.4f (target %.4f)", t, steps,
                 sum(int((~m).sum()) for m in keep.values()) / sum(sizes.values()), s_t)
    apply_masks(gm, keep)
    report = sparsity_report(gm, names)
    report.update(criterion=criterion, target_sparsity=sparsity, scope=scope, merge=bool(merge),
                  merge_fraction=merge_fraction if merge else None, steps=int(steps), hessian=hessian,
                  n_batches=len(batches) if batches else 0, seconds=round(time.time() - t0, 2))
    if criterion == "camp":
        report.update(k=k, weighting=weighting, times_theta=times_theta, power_iteration=pi_reports)
    if scope == "adaptive":
        report["beta"], report["caps"] = beta, caps
    gm.meta["oba"] = report
    return gm


__all__ = ["prune_unstructured", "apply_masks", "masks_of", "make_masks_permanent", "unmasked_copy", "sparsity_report",
           "prunable_weights", "adaptive_fractions", "WeightMask", "SCOPES"]
