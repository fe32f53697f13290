"""The criteria registry: every pruning criterion, declared once.

A criterion maps a model (and, when it needs data, one calibration batch at a time) to
per-parameter scores ``{parameter name: tensor of that parameter's shape}``;
:func:`oba_fx.score` averages the per-batch scores and :mod:`oba_fx.select` turns them into
unit and group scores. :func:`oba_fx.prune_graph`, :func:`oba_fx.score`, the ``oba-fx`` command
(its ``--criterion`` choices), the benchmarks and the README all read this registry, so a
criterion registered here is available everywhere.

This module imports no torch: the command line lists and checks criteria before anything heavy
is loaded. The built-in implementations are named as ``"module:function"`` strings and imported on
first use.

A criterion's function is called as

* ``fn(ctx)`` when it needs no data,
* ``fn(ctx, x, y)`` for each calibration batch when it does (the scores are averaged), or
* ``fn(ctx, batches)`` once, with the list of every checked ``(x, y)`` batch, when it is declared
  ``per_batch=False``: statistics that are not a mean of per-batch scores (Gram matrices for
  ``"obs"``; power iteration for ``"camp"``, which needs the Hessian of the batch-averaged loss:
  the average of per-batch eigenvectors is not an eigenvector of anything),

with ``ctx`` a :class:`oba_fx.criteria.context.ScoreContext` (the model, its scored parameter
names and values, the loss, and helpers for the gradient, ``H θ`` and diagonal estimates).
It returns per-parameter scores ``{name: tensor of the parameter's shape}`` (summed over each
unit's entries of a layer's own channel dimension, see :func:`oba_fx.select.unit_scores`) or
*space costs* ``{(name, dim): 1-D tensor over that dim}``: additive costs of removing each
index of that parameter dimension, summed over every index of a unit in every space.

Example: a criterion of your own, from your code (no edit of the package):

    >>> import torch, oba_fx
    >>> from oba_fx.criteria import register_criterion, unregister_criterion
    >>> @register_criterion("grad_l1", needs_data=True, description="|θ ⊙ g| per batch")
    ... def grad_l1(ctx, x, y):
    ...     return {n: (ctx.params[n] * g).abs() for n, g in ctx.gradient(x, y).items()}
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
    >>> small = oba_fx.prune_graph(m, torch.randn(1, 4), criterion="grad_l1", data=data,
    ...                            channel_ratio=0.5, verbose=False)
    >>> small.get_submodule("0").out_features
    4
    >>> unregister_criterion("grad_l1")
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import BadInputError

__all__ = ["Criterion", "UnknownCriterionError", "register_criterion", "unregister_criterion", "get_criterion",
           "criterion_names", "REGISTRY"]


class UnknownCriterionError(BadInputError):
    """A criterion name that is not in the registry."""


@dataclass(frozen=True)
class Criterion:
    """One pruning criterion.

    Attributes:
        name: the name users pass (``criterion="oba"``, ``--criterion oba``).
        fn: the scoring function, or ``"module:function"`` for one imported on first use.
        needs_data: whether it reads calibration batches (``fn(ctx, x, y)``) or the weights
            alone (``fn(ctx)``).
        needs_hvp: whether it multiplies by the Hessian (``ctx.hvp``): the costly criteria.
        description: one line for ``--help`` and the README.
        per_batch: ``fn(ctx, x, y)`` per batch, averaged (default), or ``fn(ctx, batches)`` once with every batch (implies ``needs_data``).
        ranking: the ranking it is meant for (:data:`oba_fx.select.RANKINGS`) when the user
            names none; ``None``: the default ``"group_max"``.
    """

    name: str
    fn: Callable[..., Any] | str
    needs_data: bool
    needs_hvp: bool = False
    description: str = ""
    per_batch: bool = True
    ranking: str | None = None

    def resolve(self) -> Callable[..., Any]:
        """The scoring function (importing it when it was given by name)."""
        if callable(self.fn):
            return self.fn
        module, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(module), attr)


#: every registered criterion by name, in registration order
REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, fn: Callable[..., Any] | str | None = None, *, needs_data: bool,
                       needs_hvp: bool = False, description: str = "", per_batch: bool = True,
                       ranking: str | None = None, replace: bool = False) -> Any:
    """Add a criterion to the registry; usable as a decorator when ``fn`` is omitted.

    Args:
        name: the criterion's name.
        fn: ``fn(ctx) -> {name: scores}`` (no data) or ``fn(ctx, x, y) -> {name: scores}``
            (per calibration batch), or ``"module:function"``.
        needs_data: see :class:`Criterion`.
        needs_hvp: see :class:`Criterion`.
        description: one line shown by ``oba-fx prune --help``.
        per_batch: see :class:`Criterion` (only for criteria that need data).
        ranking: see :class:`Criterion`.
        replace: allow replacing a criterion of the same name.

    Returns:
        The :class:`Criterion` (direct call) or a decorator returning the function unchanged.

    Raises:
        ValueError: ``name`` is taken (and ``replace`` is false) or is not a plain identifier.
    """
    if not isinstance(name, str) or not name.replace("-", "_").isidentifier():
        raise BadInputError(f"criterion name must be an identifier such as 'my_score', got {name!r}")
    if name in REGISTRY and not replace:
        raise BadInputError(f"criterion {name!r} is already registered; pick another name or pass replace=True")
    if not per_batch and not needs_data:
        raise BadInputError(f"criterion {name!r}: per_batch=False needs needs_data=True (it is called with the batches)")

    def add(f: Callable[..., Any] | str) -> Criterion:
        c = Criterion(name, f, bool(needs_data), bool(needs_hvp), description, bool(per_batch), ranking)
        REGISTRY[name] = c
        return c

    if fn is not None:
        return add(fn)

    def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
        add(f)
        return f

    return decorator


def unregister_criterion(name: str) -> None:
    """Remove a criterion added with :func:`register_criterion` (unknown names are an error)."""
    get_criterion(name)
    del REGISTRY[name]


def criterion_names(needs_data: bool | None = None) -> tuple[str, ...]:
    """Registered names; only those that need (``True``) or do not need (``False``) data.

    Example:
        >>> criterion_names(needs_data=False)
        ('l1', 'l2', 'random')
    """
    return tuple(n for n, c in REGISTRY.items() if needs_data is None or c.needs_data == needs_data)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``.

    Raises:
        UnknownCriterionError: naming the registered criteria.

    Example:
        >>> get_criterion("oba").needs_hvp
        True
        >>> get_criterion("gradnorm")
        Traceback (most recent call last):
        ...
        oba_fx.criteria.UnknownCriterionError: unknown criterion 'gradnorm'; expected one of l1, l2, random, \
oba, taylor, obd_fisher, obd_hutchinson, obs, camp (or register your own with oba_fx.criteria.register_criterion)
    """
    c = REGISTRY.get(name)
    if c is None:
        raise UnknownCriterionError(
            f"unknown criterion {name!r}; expected one of {', '.join(REGISTRY)} "
            "(or register your own with oba_fx.criteria.register_criterion)")
    return c


# ------------------------------------------------------------------------------- built-ins
_MAG = "oba_fx.criteria.magnitude"
_SO = "oba_fx.criteria.second_order"
register_criterion("l1", f"{_MAG}:l1", needs_data=False, description="|θ| (magnitude)")
register_criterion("l2", f"{_MAG}:l2", needs_data=False, description="θ² (magnitude)")
register_criterion("random", f"{_MAG}:random", needs_data=False, description="seeded uniform noise (baseline)")
# Default rankings measured by benchmarks/ranking.py (pretrained ResNet-56/20 one-shot with compensation,
# retained FLOPs 0.7/0.5/0.35, 3 calibration seeds): OBA's and Taylor's loss change per FLOP beat the OBA
# paper's group_max rule in every cell (OBA +0.7 to +7.1 points), and OBS's loss change normalised per
# coupling group beat comparing it globally in every cell (+1.4 to +9.9 points). See the README.
register_criterion("oba", f"{_SO}:oba", needs_data=True, needs_hvp=True, ranking="per_flop",
                   description="θ ⊙ (Hθ), exact (Optimal Brain Apoptosis); hessian='functional' or 'full'")
register_criterion("taylor", f"{_SO}:taylor", needs_data=True, ranking="per_flop",
                   description="θ ⊙ g (first-order Taylor)")
register_criterion("obd_fisher", f"{_SO}:obd_fisher", needs_data=True,
                   description="θ² ⊙ diag(empirical Fisher) (OBD)")
register_criterion("obd_hutchinson", f"{_SO}:obd_hutchinson", needs_data=True, needs_hvp=True,
                   description="θ² ⊙ Hutchinson estimate of diag(H) (OBD)")
register_criterion("obs", "oba_fx.criteria.obs:obs", needs_data=True, per_batch=False, ranking="group_max",
                   description="loss change of removing a unit after the least-squares re-fit of its consumers "
                               "(OBS with a Fisher-weighted output error)")
register_criterion("camp", "oba_fx.criteria.camp:camp", needs_data=True, needs_hvp=True, per_batch=False,
                   description="|v| of the top Hessian eigenvector by power iteration over all batches (CAMP-HiVe)")
