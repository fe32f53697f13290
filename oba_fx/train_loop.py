"""One training epoch: the batch loop of :func:`~oba_fx.finetune.finetune` and of the benchmarks.

Each batch: forward, loss (distilled with a teacher, :mod:`oba_fx.distill`), backward, masked
gradients, an optimizer step, masked weights; running sums stay on the device and the loss is
checked for NaN / infinity every few batches.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .batches import length, module_device, to_device
from .checks import LabelCheck
from .distill import (DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE, check_distill_settings, check_teacher,
                      distillation_loss, teacher_on)
from oba_fx.errors import BadInputError, BadNameError, DivergedError

__all__ = ["apply_masks", "prepare_masks", "train_epoch"]

logger = logging.getLogger(__name__)


def _batch_size(y: Any) -> int:
    if isinstance(y, torch.Tensor) and y.dim() > 0:
        return int(y.shape[0])
    if isinstance(y, (list, tuple)) and y:
        return _batch_size(y[0])
    return 1


def prepare_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None
                  ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """``(parameter, mask)`` pairs from ``{parameter name: 0/1 tensor}``, each mask checked against
    its parameter's shape and moved to its device and dtype."""
    if not masks:
        return []
    params = dict(model.named_parameters())
    out = []
    for name, mask in masks.items():
        if name not in params:
            raise BadNameError(f"mask for {name!r}, which is not a parameter of the model; parameters are e.g. "
                               f"{sorted(params)[:8]}")
        p = params[name]
        mask = torch.as_tensor(mask)
        if mask.shape != p.shape:
            raise BadInputError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        out.append((p, mask.to(device=p.device, dtype=p.dtype)))
    return out


@torch.no_grad()
def apply_masks(masks: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Zero every masked weight (in place)."""
    for p, m in masks:
        p.mul_(m)



@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Every submodule in eval mode inside the block; each one's own mode restored after it."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training



def _forward(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _loss(model: nn.Module, teacher: nn.Module | None, x: Any, y: Any, loss_fn: Callable,
          distill: tuple[float, float]) -> tuple[torch.Tensor, Any]:
    """The batch's training loss (distilled with a teacher) and the model's outputs."""
    out = _forward(model, x)
    if teacher is None:
        return loss_fn(out, y), out
    with torch.no_grad():
        teacher_out = _forward(teacher, x)
    return distillation_loss(out, teacher_out, y, *distill, loss_fn=loss_fn), out


def _correct(out: Any, y: Any) -> torch.Tensor | None:
    """Top-1 hits (a 0-d tensor on the outputs' device) of a ``(batch, classes)`` output on class-index
    targets; ``None`` for other outputs."""
    if (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and out.dim() == 2 and y.dim() == 1
            and len(y) == len(out) and not y.is_floating_point()):
        return (out.detach().argmax(1) == y).sum()
    return None


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
          masks: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Backward, masked gradients, optimizer step, masked weights."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if masks:
        with torch.no_grad():
            for p, m in masks:
                if p.grad is not None:
                    p.grad.mul_(m)
    optimizer.step()
    apply_masks(masks)


class _Tally:
    """Running sums of an epoch: per-sample loss, samples, batches, top-1 hits.

    The loss and hit sums stay on the training device (no host synchronisation per batch);
    :meth:`sums` reads them.
    """

    def __init__(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0
        self.samples, self.batches, self.no_accuracy = 0, 0, 0

    def add(self, loss: torch.Tensor, y: Any, correct: torch.Tensor | None) -> None:
        bs = _batch_size(y)
        self.loss = self.loss + loss.detach().double() * bs
        self.samples += bs
        self.batches += 1
        if correct is None:
            self.no_accuracy += 1
        else:
            self.correct = self.correct + correct

    def sums(self) -> dict[str, float]:
        """The sums as Python numbers (one host synchronisation)."""
        return {"loss": float(self.loss), "samples": float(self.samples), "batches": float(self.batches),
                "correct": float(self.correct), "no_accuracy": float(self.no_accuracy)}


def _result(sums: Mapping[str, float], seconds: float) -> dict[str, Any]:
    """``train_epoch``'s result from (possibly all-reduced) tally sums."""
    n = sums["samples"]
    return {"loss": sums["loss"] / n, "samples": int(n), "batches": int(sums["batches"]),
            "accuracy": sums["correct"] / n if sums["no_accuracy"] == 0 else None, "seconds": seconds,
            "sums": dict(sums)}


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    distill_weight: float = DEFAULT_DISTILL_WEIGHT,
    masks: Mapping[str, torch.Tensor] | None = None,
    scheduler: Any = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "training",
    log_every: int = 0,
    on_step: Callable[[int, Callable[[], dict[str, float]]], None] | None = None,
) -> dict[str, Any]:
    """One pass over ``loader``: forward, loss, backward and an ``optimizer`` step per batch.

    The training loop of :func:`finetune` and of the benchmarks; any optimizer works (SGD, AdamW,
    ...). The model is put in train mode (and left there); batches are moved to ``device``.

    Args:
        model: The network, trained in place.
        loader: Iterable of ``(inputs, targets)`` batches; ``inputs`` may be a tuple of positional
            inputs.
        optimizer: Steps the model's parameters.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean loss; default cross-entropy. With a
            teacher it is the hard term of :func:`distillation_loss`.
        teacher: Distil from this model's logits (:func:`distillation_loss`). It runs in eval
            mode under ``torch.no_grad()`` on the student's device (a copy is used if it lives
            elsewhere), its parameters are never changed, and each submodule's train/eval mode
            is restored afterwards.
        temperature: Distillation temperature (with a teacher).
        distill_weight: Share of the distillation term (with a teacher); 0 skips the teacher.
        masks: ``{parameter name: 0/1 tensor}``; gradients are masked before, and weights after,
            every step, so masked weights stay zero once they are.
        scheduler: Stepped after every optimizer step (per-batch schedules such as warm-up and
            cosine); epoch schedules belong to the caller.
        device: Where the batches go; default the model's device.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar with the running mean loss.
        desc: Label of the bar and of error and log messages (e.g. ``"epoch 2/5"``).
        log_every: Log the running mean loss every this many batches (0: never).
        on_step: Called after every optimizer step as ``on_step(batches done, sums)``; ``sums()``
            returns the running ``{"loss", "samples", "batches", "correct", "no_accuracy"}`` (per-sample
            loss summed), reading them from the device (:func:`finetune` writes its mid-epoch
            checkpoints here).

    Returns:
        ``{"loss": mean per-sample loss, "samples": n, "batches": n, "accuracy": top-1 on the
        training batches as trained (``None`` if the outputs are not (batch, classes) logits),
        "seconds": wall time, "sums": the sums behind them (see ``on_step``)}``.

    Raises:
        ValueError: ``loader`` yielded no batches, or a bad teacher (see :func:`distillation_loss`).
        FloatingPointError: The loss became NaN or infinite.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        >>> stats = [train_epoch(model, DataLoader(TensorDataset(x, y), batch_size=16), opt, progress=False)
        ...          for _ in range(5)]
        >>> stats[-1]["samples"], stats[-1]["batches"], stats[-1]["loss"] < stats[0]["loss"]
        (64, 4, True)
    """
    dev = torch.device(device) if device is not None else module_device(model)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    mask_list = prepare_masks(model, masks)
    if teacher is not None:
        check_teacher(teacher, model)
        check_distill_settings(temperature, distill_weight)
        teacher = teacher_on(teacher, dev) if distill_weight > 0 else None
    model.train()
    with _eval_mode(teacher) if teacher is not None else contextlib.nullcontext():
        return _run_batches(model, loader, optimizer, loss_fn, teacher, (temperature, distill_weight), mask_list,
                            scheduler, dev, max_batches, progress, desc, log_every, on_step)


#: the loss is checked for NaN / infinity (a host synchronisation) every this many batches
_CHECK_EVERY = 10


def _checked(tally: _Tally, desc: str, first: int) -> dict[str, float]:
    """The tally's sums; raises if the loss of a batch since batch ``first`` was not finite."""
    sums = tally.sums()
    if not math.isfinite(sums["loss"]):
        raise DivergedError(f"training loss is {sums['loss']} in {desc}, between batches {first} and "
                            f"{tally.batches}; lower the learning rate")
    return sums


def _run_batches(model, loader, optimizer, loss_fn, teacher, distill, mask_list, scheduler, dev, max_batches,
                 progress, desc, log_every, on_step=None) -> dict[str, Any]:
    """The batch loop of :func:`train_epoch` (arguments checked there)."""
    tally, t0, checked = _Tally(), time.perf_counter(), 1
    # The bar is fed by hand: handed the loader, tqdm.auto's class calls iter() on it at once, which starts a
    # DataLoader's worker processes and draws from its generator for an iterator that is thrown away.
    labels = LabelCheck(model, isinstance(loss_fn, nn.CrossEntropyLoss), lambda x: _forward(model, x))
    bar = tqdm(desc=desc, disable=not progress, leave=False, total=length(loader, max_batches))
    try:
        for i, batch in enumerate(itertools.islice(loader, max_batches)):  # no batch beyond max_batches is drawn
            x, y = to_device(batch[0], dev), to_device(batch[1], dev)
            labels(x, y, f"{desc}, batch {i + 1}")
            loss, out = _loss(model, teacher, x, y, loss_fn, distill)
            _step(loss, optimizer, mask_list)
            if scheduler is not None:
                scheduler.step()
            tally.add(loss, y, _correct(out, y))
            bar.update(1)
            b = tally.batches
            if b % _CHECK_EVERY == 0 or (log_every and b % log_every == 0):
                sums, checked = _checked(tally, desc, checked), b + 1
                bar.set_postfix(loss=f"{sums['loss'] / sums['samples']:.4f}")
                if log_every and b % log_every == 0:
                    logger.info("%s, batch %d: mean loss %.4f", desc, b, sums["loss"] / sums["samples"])
            if on_step is not None:
                on_step(b, lambda: _checked(tally, desc, 1))
    finally:
        bar.close()
    if tally.batches == 0:
        raise BadInputError(f"{desc}: the training loader yielded no batches")
    return _result(_checked(tally, desc, checked), time.perf_counter() - t0)
