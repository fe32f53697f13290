"""Per-parameter importance scores from calibration batches (OBA, Taylor, OBD) and data-free ones.

:func:`score` returns, for every parameter of the model, a tensor of the parameter's shape: the
mean over batches of the per-batch score of a criterion of the registry :mod:`oba_fx.criteria`.
The second-order quantities come from :mod:`oba_fx.hvp` (one dual forward and one backward per
batch, exact ``H θ``).

**Mode.** By default the model is scored in **eval mode**: BatchNorm uses its running
statistics, which are constants, so each sample's loss depends on that sample alone (what the
pruned network computes at inference, and what per-sample gradients assume), and dropout is
off. ``mode="train"`` scores the train-mode function instead (batch statistics are then part of
the function, exactly differentiated); ``mode="keep"`` uses the modes the modules are in. In
every case the model is never mutated: parameters are read, buffers are passed as copies (running
statistics are not updated) and every module's ``training`` flag is restored.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> s = score(m, data, criterion="oba", hessian="full", progress=False)
    >>> {k: tuple(v.shape) for k, v in s.items()}
    {'0.weight': (4, 3), '0.bias': (4,), '2.weight': (2, 4), '2.bias': (2,)}
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .batches import bar, length, take, to_device
from .checks import LabelCheck, check_data, check_finite_scores, check_inputs_usable, check_model, split_batch
from .criteria import criterion_names, get_criterion
from .criteria.context import ScoreContext
from .distributed import all_reduce_sum, is_main, shard, sum_number
from .hvp import HESSIAN_MODES, LossFn, check_hessian
from oba_fx.errors import BadInputError

log = logging.getLogger(__name__)

#: scoring modes
MODES = ("eval", "train", "keep")


def score(model: nn.Module, data: Iterable | None, *, example_inputs: Any = None, criterion: str = "oba",
          hessian: str = "functional", loss_fn: LossFn | None = None, first_order: float = 0.0,
          max_batches: int | None = None, probes: int = 16, seed: int = 0, progress: bool = True,
          mode: str = "eval") -> dict[str, torch.Tensor]:
    """Per-parameter scores, averaged over calibration batches.

    Criteria (``θ`` a parameter, ``g`` the batch gradient, ``H`` the batch Hessian over *all*
    floating parameters of the model, ``⊙`` elementwise):

    * ``"oba"``: ``θ ⊙ (H θ) + first_order · θ ⊙ g``, with ``H`` the functional Hessian ``H_F``
      (``hessian="functional"``, the OBA paper's quantity) or the full ``H`` (``"full"``).
      Note the sign: the Taylor loss change of removing ``θ`` is ``−gᵀθ + ½ θᵀHθ``, so the
      design's ``−λ θ g`` is ``first_order=−λ``.
    * ``"taylor"``: ``θ ⊙ g``.
    * ``"obd_fisher"``: ``θ² ⊙ diag(F)`` with the empirical Fisher
      ``F = (1/N) Σ_n g_n g_nᵀ``, ``g_n = ∇_θ loss_fn(z_n, y_n)`` the gradient of sample ``n``'s
      loss (``loss_fn`` applied to a batch of that one sample's logits) and ``N`` the batch size;
      so ``diag(F) = (1/N) Σ_n g_n²``. Per-sample gradients use ``torch.func.vmap(grad)`` when
      every module is in eval mode, else one forward of the whole batch and one backward per
      sample (exact when batch statistics couple the samples).
    * ``"obd_hutchinson"``: ``θ² ⊙ d`` with ``d = (1/K) Σ_k r_k ⊙ (H r_k)`` the Hutchinson
      estimate of ``diag(H)`` (full Hessian) from ``K = probes`` Rademacher vectors per batch.
    * ``"camp"`` (CAMP-HiVe): ``Σ_j w_j |v_j|`` over the top eigenvectors of the Hessian of the
      loss averaged over *all* batches (:func:`oba_fx.power_iteration`; registered with
      ``per_batch=False``, so it is called once with every batch rather than averaged per
      batch; ``hessian`` picks ``H_F`` or ``H``, see :mod:`oba_fx.criteria.camp`).
    * data-free: ``"l1"`` ``|θ|``, ``"l2"`` ``θ²``, ``"random"`` uniform ``[0, 1)`` noise drawn
      from ``torch.Generator().manual_seed(seed)`` (float32, in parameter order, then cast).

    Args:
        model: an ``nn.Module`` or ``torch.fx.GraphModule`` returning logits. Never mutated.
        data: an iterable of ``(x, y)`` batches (ignored by the data-free criteria).
        example_inputs: when given (and ``criterion="oba"``), the fused computation is generated
            once as an FX program (:func:`oba_fx.hvp_program.build_hvp_program`) for batches whose input
            has this shape and reused for them (cheaper per batch after a one-off trace); other
            batches run eagerly. A GraphModule whose ``meta["oba.hvp_program"]`` (written by
            ``HVPCodegen``) fits is used the same way.
        criterion: a registered criterion (:func:`oba_fx.criteria.criterion_names`).
        hessian: ``"functional"`` or ``"full"`` (used by ``"oba"``).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default mean cross-entropy.
        first_order: weight of ``θ ⊙ g`` added to the OBA score.
        max_batches: use at most this many batches.
        probes: Rademacher probes per batch for ``"obd_hutchinson"``.
        seed: seeds the Hutchinson probes and the ``"random"`` scores.
        progress: show a tqdm bar over batches (tqdm disables itself when not on a terminal).
        mode: ``"eval"`` (default, see the module docstring), ``"train"`` or ``"keep"``.

    Returns:
        ``{name: score}`` for every ``model.named_parameters()`` name, in the parameter's shape,
        dtype and device; or, for a criterion returning space costs (``"obs"``), ``{(name, dim):
        cost of each index}``.

    Raises:
        BadInputError: (a ``ValueError``) unknown ``criterion`` (an
            :class:`oba_fx.criteria.UnknownCriterionError`), ``hessian`` or ``mode``; no batches in
            ``data``; labels that do not fit the logits; a model on the meta device.
        BadTypeError: (a ``TypeError``) ``model`` is not an ``nn.Module``; ``data`` is a bare tensor
            or its batches are not ``(inputs, targets)`` pairs.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> score(m, None, criterion="gradnorm")
        Traceback (most recent call last):
        ...
        oba_fx.criteria.UnknownCriterionError: unknown criterion 'gradnorm'; expected one of l1, l2, random, \
oba, taylor, obd_fisher, obd_hutchinson, obs, camp (or register your own with oba_fx.criteria.register_criterion)
    """
    crit = get_criterion(criterion)
    check_hessian(hessian)
    if mode not in MODES:
        raise BadInputError(f"unknown mode {mode!r}; expected one of {MODES}")
    check_model(model, "score", traced=False)
    check_data(data, "score")
    ctx = ScoreContext.for_model(model, loss_fn=loss_fn, hessian=hessian, first_order=first_order, probes=probes,
                                 seed=seed, example_inputs=example_inputs)
    fn = crit.resolve()
    if not crit.needs_data:
        return _like_params(model, fn(ctx))
    if data is None:
        raise BadInputError(
            f"criterion {criterion!r} needs calibration data: pass data=<iterable of (inputs, targets)>, "
            f"or use a data-free criterion ({', '.join(criterion_names(needs_data=False))})")
    device = next(iter(ctx.params.values())).device if ctx.params else torch.device("cpu")
    log.info("scoring %d parameter tensors with %r (hessian=%s, mode=%s)", len(ctx.names), criterion, hessian, mode)
    seen = [0]
    labels = LabelCheck(model, enabled=loss_fn is None)  # the default cross-entropy needs class indices

    def batches(sharded: bool) -> Iterator[tuple[Any, Any]]:
        items = enumerate(take(data, max_batches))
        for i, batch in bar(shard(items) if sharded else items, progress and is_main(), f"score[{criterion}]",
                            length(data, max_batches)):
            x, y = (to_device(t, device) for t in split_batch(batch, f"calibration batch {i}"))
            check_inputs_usable(x, f"calibration batch {i}")
            labels(x, y, f"calibration batch {i}")
            seen[0] += 1
            yield x, y

    with _scoring_mode(model, mode):
        if crit.per_batch:  # each rank scores its share; the sums are added over the ranks
            totals = _like_params(model, _batch_sum(ctx, fn, batches(True), criterion))
            n = sum_number(seen[0])
            out = {k: all_reduce_sum(t) / max(n, 1) for k, t in totals.items()}
        else:  # a whole-data criterion sees every batch (on every rank) and may pass over them many times
            out = fn(ctx, list(batches(False)))
            n = seen[0]
            check_finite_scores(out, f"criterion {criterion!r}")
    if n == 0:
        raise BadInputError("no batches: `data` yielded nothing (or max_batches=0)")
    log.info("scored %d batches", int(n))
    return _like_params(model, out)


def _batch_sum(ctx: ScoreContext, fn: Any, batches: Iterable, criterion: str) -> dict[str, torch.Tensor]:
    """The sum over batches of ``fn(ctx, x, y)``."""
    totals: dict[str, torch.Tensor] = {}
    for i, (x, y) in enumerate(batches):
        per = fn(ctx, x, y)
        check_finite_scores(per, f"criterion {criterion!r} on calibration batch {i}")
        for k, v in per.items():
            totals[k] = totals[k] + v if k in totals else v.clone()
    return totals


def _like_params(model: nn.Module, scores: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """Every parameter of ``model`` gets a score of its shape (zeros where the criterion gave none);
    space costs (``(name, dim)`` keys) are returned as they are."""
    if any(isinstance(k, tuple) for k in scores):
        return dict(scores)
    out = {}
    for n, p in model.named_parameters():
        s = scores.get(n)
        out[n] = torch.zeros_like(p, memory_format=torch.contiguous_format).detach() if s is None else s
    return out


class _scoring_mode:
    """Put the model in the scoring mode; restore every module's ``training`` flag afterwards."""

    def __init__(self, model: nn.Module, mode: str):
        self.model, self.mode = model, mode
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> nn.Module:
        if self.mode != "keep":
            self.model.train(self.mode == "train")
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


__all__ = ["score", "MODES", "HESSIAN_MODES"]
