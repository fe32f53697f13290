"""CAMP-HiVe importance: the dominant curvature directions of the loss (``"camp"``).

Power iteration with exact Hessian-vector products (:func:`oba_fx.power_iteration`) gives the
top-``k`` eigenpairs ``(λ_j, v_j)`` of the Hessian of the loss averaged over all calibration
batches, each ``v_j`` normalised across all parameters (``docs/design.md`` "CAMP-HiVe"). A
weight's importance is

* ``|v_1,i|`` (``k=1``, the paper's), or, over ``k`` vectors, ``Σ_j w_j |v_j,i|`` with
  ``w_j = |λ_j| / Σ_l |λ_l|`` (``weighting="lambda"``) or ``1/k`` (``"uniform"``);
* times ``|θ_i|`` (``times_theta=True``, the default of :func:`camp` and of
  :func:`oba_fx.prune_unstructured`, chosen by measurement: on pretrained ResNet-20/56, one-shot,
  ``|v|`` alone prunes no better than random noise unstructured (10–19 % at 50 % sparsity against
  10 % random), ``|v|·|θ|`` reaches 31–55 %; structured it is equal or better at every target,
  ``benchmarks/results/camp.md``). ``k > 1`` was not measured (each pair costs as much as the
  first); ``weighting="lambda"`` is the default.

A tensor's **curvature share** (:func:`curvature_share`) is ``Σ_j w_j Σ_{i ∈ tensor} v_j,i²``:
the part of the (weighted) Rayleigh quotient its coordinates carry; the shares of all tensors sum
to 1. :func:`oba_fx.unstructured.prune_unstructured` turns it into per-layer pruning fractions.
Structured (:func:`oba_fx.prune_graph`), ``ranking="curvature"`` does the same per coupling
group from the unit scores (:func:`oba_fx.select.curvature_keys`): a group's share is the sum of
its units' importance, flat groups lose more, within ``max_layer_ratio``, and the FLOPs target is
met as with the other rankings; ``steps > 1`` rescores, so the shares are re-estimated per step.

The registered ``"camp"`` uses the defaults below and the context's ``hessian`` and ``seed``;
register a variant with other options with ``functools.partial``:

Example:
    >>> import functools, torch, oba_fx
    >>> from oba_fx.criteria import register_criterion, unregister_criterion
    >>> _ = register_criterion("camp_k2", functools.partial(camp, k=2, iters=50), needs_data=True,
    ...                        per_batch=False)
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> s = oba_fx.score(m, data, criterion="camp_k2", hessian="full", progress=False)
    >>> s["0.weight"].shape, bool((s["0.weight"] >= 0).all())
    (torch.Size([4, 3]), True)
    >>> unregister_criterion("camp_k2")
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from ..hessian_eigen import PowerIterationResult, power_iteration
from .context import ScoreContext
from ..errors import BadInputError

log = logging.getLogger(__name__)

#: how the ``k`` eigenvectors are combined
WEIGHTINGS = ("lambda", "uniform")


def _weights(result: PowerIterationResult, weighting: str) -> list[float]:
    if weighting not in WEIGHTINGS:
        raise BadInputError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    lams = [abs(x) for x in result.eigenvalues]
    total = sum(lams)
    if weighting == "uniform" or total == 0.0:
        return [1.0 / len(lams)] * len(lams)
    return [x / total for x in lams]


def camp_importance(result: PowerIterationResult, params: Mapping[str, torch.Tensor] | None = None, *,
                    weighting: str = "lambda", times_theta: bool = False) -> dict[str, torch.Tensor]:
    """Per-parameter importance ``Σ_j w_j |v_j|`` (times ``|θ|`` with ``times_theta``).

    Args:
        result: from :func:`oba_fx.power_iteration`.
        params: ``{name: θ}`` (needed for ``times_theta``).
        weighting: ``"lambda"`` or ``"uniform"`` (see the module docstring).
        times_theta: multiply by ``|θ|``.

    Example:
        >>> r = PowerIterationResult((3.0, -1.0), ({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, -1.0])}),
        ...                          (1, 1), (0.0, 0.0), (True, True), ("w",))
        >>> camp_importance(r)["w"].tolist()
        [0.75, 0.25]
    """
    if times_theta and params is None:
        raise BadInputError("times_theta=True needs params={name: θ}")
    w = _weights(result, weighting)
    out = {}
    for n in result.param_names:
        s = sum(wj * v[n].abs() for wj, v in zip(w, result.eigenvectors))
        out[n] = s * params[n].abs() if times_theta else s
    return out


def curvature_share(result: PowerIterationResult, weighting: str = "lambda") -> dict[str, float]:
    """Each tensor's share of the weighted curvature, ``Σ_j w_j ‖v_j[tensor]‖²`` (sums to 1).

    Example:
        >>> r = PowerIterationResult((2.0,), ({"a": torch.tensor([0.6]), "b": torch.tensor([0.8])},), (1,), (0.0,),
        ...                          (True,), ("a", "b"))
        >>> {k: round(v, 4) for k, v in curvature_share(r).items()}
        {'a': 0.36, 'b': 0.64}
    """
    w = _weights(result, weighting)
    return {n: float(sum(wj * v[n].double().square().sum() for wj, v in zip(w, result.eigenvectors)))
            for n in result.param_names}


def camp(ctx: ScoreContext, batches: Sequence[tuple[Any, Any]], *, k: int = 1, iters: int = 30, tol: float = 1e-3,
         weighting: str = "lambda", times_theta: bool = True) -> dict[str, torch.Tensor]:
    """The ``"camp"`` criterion (``per_batch=False``): power iteration over every batch, then
    :func:`camp_importance`. The Hessian is ``ctx.hessian``, the start vectors are seeded with
    ``ctx.seed``; the scoring mode is already set by :func:`oba_fx.score` (``mode="keep"`` here)."""
    r = power_iteration(ctx.model, batches, k=k, iters=iters, tol=tol, seed=ctx.seed, hessian=ctx.hessian,
                        loss_fn=ctx.loss_fn, param_names=ctx.names, mode="keep", progress=True)
    if not all(r.converged):
        log.warning("camp: power iteration stopped after %s products before reaching tol=%g (relative residuals "
                    "%s); the importance uses the last iterate", r.iterations, tol,
                    [f"{p['relative_residual']:.2e}" for p in r.report()["pairs"]])
    return camp_importance(r, ctx.params, weighting=weighting, times_theta=times_theta)
