"""Fine-tuning after pruning, with the OBA paper's recipe as defaults, checkpoints and exact resume.

The recipe (OBA paper, CIFAR): SGD with momentum 0.9, learning rate 1e-3, weight decay 5e-4,
batches of 64 (the loader's choice), the learning rate multiplied by ``gamma = 0.1`` at the
milestones ``[epochs // 2, 3 * epochs // 4]``. Each epoch is one call of :func:`train_epoch`, the
training loop the benchmarks use too (with any optimizer and per-batch schedule).

``oba-fx prune --finetune-epochs N`` uses ``schedule="cosine"`` from ``lr=3e-3`` instead (:class:`CosineSteps`;
``--lr-schedule step`` for the paper's): measured on pruned ResNet-56 with one distilled epoch it held
≥ 91.5 % on the exact test images in each of three calibration seeds and gained 0.7–1.0 points on the
JPEG test images over the paper's schedule (README, ``benchmarks/finetuned.py --schedule cosine``).

Distillation: with ``teacher=`` (for pruning: the dense model before pruning, as ``oba-fx prune
--finetune-epochs N`` does by default) each batch's loss is :func:`~oba_fx.distill.distillation_loss`
(defaults ``T = 4``, ``α = 0.9``; :mod:`oba_fx.distill` says why).
``benchmarks/finetune_recipe.py`` measures the recipe on the dense pretrained ResNet-56 (one
epoch on the first 25,000 training images): labels only 92.6 → 91.0 % on the 1,000 exact test
images (83.9 → 88.7 % on JPEG test images, the training distribution); self-distilled with these
defaults 92.6 → 93.2 % (84.3 % JPEG).

Checkpoints and resume: with ``checkpoint_dir`` the loop writes ``last.pt`` after every epoch
(atomically: a temporary file, then :func:`os.replace`), holding the model's and the optimizer's
state, the scheduler, the number of epochs done, the history and the random-number states. A later
call with the same ``checkpoint_dir`` (and ``resume=True``) continues with the next epoch: an
interrupted run loses no finished epoch and repeats none. The resumed run ends with exactly the
weights of an uninterrupted one when

* both start from the same state: same initial weights and the same RNG state at the start of the
  first run (e.g. ``torch.manual_seed(0)`` before building the model);
* the training batches come in a reproducible order: shuffle with a seeded generator
  (``cifar10_loader(..., shuffle=True, seed=0)`` or ``DataLoader(..., generator=g)``), or from
  torch's global RNG (restored from the checkpoint too) seeded before the first run; data
  augmentation must draw from torch's, Python's or NumPy's global RNG, or the loader's generator
  (all saved); with worker processes, their seeds derive from these and stay reproducible;
* the kernels are deterministic (always on CPU; on CUDA see
  :func:`torch.use_deterministic_algorithms`);
* the call is the same: model architecture, loader contents, ``loss_fn``, ``max_batches``,
  ``masks``, the teacher (not saved in the checkpoint) and hyperparameters. Only ``epochs`` may
  grow (to extend a finished run); note that the default milestones depend on ``epochs``, so
  pass ``milestones`` explicitly when extending. If the hyperparameters differ from the
  checkpoint's, the current ones are used from the next epoch on and a warning is logged.

Mid-epoch checkpoints: with ``checkpoint_every=k`` ``last.pt`` is also written after every ``k``
optimizer steps, so an interrupt loses at most ``k - 1`` steps of work; the resumed run redoes them
and no update is applied twice ("nothing lost, nothing repeated": the surviving updates use every
sample exactly once per epoch, in the batches of an uninterrupted run).

Data parallel (``torchrun``, or any initialised process group with more than one rank): the model
is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, the loader's dataset is read
through a :class:`~oba_fx.finetune_ddp.ShardSampler` (a ``DistributedSampler``; ``set_epoch`` every
epoch) and its ``batch_size`` is the *global* batch, split evenly over the ranks, so that training
does not depend on the number of ranks. Rank 0 alone writes checkpoints (and reads them: the others
receive them), and a checkpoint written on any number of ranks resumes on any other (pass
``shard=True`` on one process to write such checkpoints; the CLI does under torchrun). See
:mod:`oba_fx.finetune_ddp` for the order and what is exact.

The checkpoint (:mod:`oba_fx.checkpoint`) holds only tensors and plain Python values, so it loads
with ``torch.load(..., weights_only=True)``.

Example:
    >>> import tempfile, torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(128, 4); y = (x[:, 0] > 0).long()
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> model = torch.nn.Linear(4, 2)
    >>> res = finetune(model, loader, epochs=3, lr=0.1, eval_loader=loader, progress=False,
    ...                checkpoint_dir=tempfile.mkdtemp())
    >>> res.epochs, res.epochs_run, res.train_loss[-1] < res.train_loss[0], res.eval_accuracy[-1] > 0.8
    ((1, 2, 3), (1, 2, 3), True, True)
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .batches import length, module_device
from .checkpoint import CHECKPOINT_NAME, FORMAT, VERSION, read_checkpoint, rng_state, scheduler_state, set_rng_state
from .distill import (DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE, check_distill_settings, check_teacher,
                      distillation_loss, teacher_on)
from .distributed import is_main, world
from .evaluate import evaluate
from .finetune_ddp import EpochData, data_parallel, reduce_sums, use_shards
from .io import atomic_save
from .checks import check_data, check_model
from .train_loop import apply_masks, prepare_masks, train_epoch
from oba_fx.errors import BadInputError

__all__ = ["CHECKPOINT_NAME", "DEFAULT_DISTILL_WEIGHT", "DEFAULT_TEMPERATURE", "CosineSteps", "FinetuneResult",
           "distillation_loss", "finetune", "train_epoch"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did: the whole history, including epochs restored from a checkpoint.

    Attributes:
        epochs: 1-based numbers of the epochs in the history (all done so far).
        train_loss: Mean training loss of each epoch (per sample).
        eval_accuracy: Top-1 accuracy on ``eval_loader`` after each epoch (``None`` without one).
        lr: Learning rate used in each epoch (with ``schedule="cosine"``: at its first step).
        epochs_run: The epochs this call ran (the rest came from the checkpoint).
        resumed_from: Epochs already done when this call started (0: a fresh run).
        resumed_step: Steps of the next epoch already done when this call started.
        checkpoint: Path of ``last.pt``, or ``None`` without ``checkpoint_dir``.

    Example:
        >>> r = FinetuneResult(epochs=(1, 2), train_loss=(0.9, 0.5), eval_accuracy=(0.6, 0.7),
        ...                    lr=(0.1, 0.1), epochs_run=(2,), resumed_from=1)
        >>> r.final_accuracy, r.best_accuracy
        (0.7, 0.7)
    """

    epochs: tuple[int, ...]
    train_loss: tuple[float, ...]
    eval_accuracy: tuple[float | None, ...]
    lr: tuple[float, ...]
    epochs_run: tuple[int, ...]
    resumed_from: int = 0
    checkpoint: str | None = None
    resumed_step: int = 0

    @property
    def final_accuracy(self) -> float | None:
        """Accuracy after the last epoch (``None`` if never evaluated)."""
        return self.eval_accuracy[-1] if self.eval_accuracy else None

    @property
    def best_accuracy(self) -> float | None:
        """Best accuracy over the epochs (``None`` if never evaluated)."""
        accs = [a for a in self.eval_accuracy if a is not None]
        return max(accs) if accs else None



def _lr_for_epoch(lr: float, gamma: float, milestones: list[int], epoch0: int) -> float:
    """Learning rate of the 0-based epoch ``epoch0`` under a multi-step schedule."""
    return lr * gamma ** sum(1 for m in milestones if m <= epoch0)



# ----------------------------------------------------------------------------------------------
# the fine-tuning run


def _check_finetune_args(model: Any, epochs: Any, max_batches: int | None, teacher: Any, temperature: float,
                         distill_weight: float) -> None:
    check_model(model, "finetune", traced=False, finite=False)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise BadInputError(f"epochs must be a non-negative int, got {epochs!r}")
    if max_batches is not None and max_batches < 1:
        raise BadInputError(f"max_batches must be positive, got {max_batches}")
    if teacher is not None:
        check_teacher(teacher, model)
        check_distill_settings(temperature, distill_weight)


def _steps_per_epoch(data: EpochData, max_batches: int | None) -> int:
    """Optimizer steps in one epoch, for ``schedule="cosine"``."""
    n = length(data.loader, max_batches)
    if n is None:
        raise BadInputError("schedule='cosine' needs the number of steps per epoch, but the training loader has "
                            "no len(); pass a DataLoader (or any sized iterable), max_batches, or schedule='step'")
    return n


def _checked_milestones(epochs: int, milestones: list[int] | None, schedule: str = "step") -> list[int]:
    if schedule not in ("step", "cosine"):
        raise BadInputError(f"schedule must be 'step' (multi-step, per epoch) or 'cosine' (per step), got {schedule!r}")
    if schedule == "cosine":
        if milestones is not None:
            raise BadInputError(f"milestones={milestones!r} belong to schedule='step'; schedule='cosine' decays "
                                "every step on its own: pass one or the other")
        return []
    if milestones is None:
        return [m for m in (epochs // 2, 3 * epochs // 4) if m > 0]
    milestones = [int(m) for m in milestones]
    if any(m < 1 for m in milestones):
        raise BadInputError(f"milestones are numbers of epochs after which the LR decays; they must be >= 1, "
                         f"got {milestones}")
    return milestones


class CosineSteps:
    """Sets the learning rate of every optimizer step: ``lr * (1 + cos(pi * k / total)) / 2`` for step
    ``k`` (0-based, counted over all epochs), so it falls from ``lr`` to 0 along half a cosine.

    A pure function of the step, so a resumed run needs only the number of steps done. Passed to
    :func:`train_epoch` as its ``scheduler`` (stepped after every optimizer step).

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> steps = CosineSteps(opt, lr=0.4, total=4, done=0)
        >>> lrs = [opt.param_groups[0]["lr"]]
        >>> for _ in range(4):
        ...     steps.step(); lrs.append(round(opt.param_groups[0]["lr"], 6))
        >>> lrs
        [0.4, 0.341421, 0.2, 0.058579, 0.0]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total: int, done: int) -> None:
        self.optimizer, self.lr, self.total, self.done = optimizer, lr, total, done
        self._apply()

    def at(self, step: int) -> float:
        """The learning rate of 0-based step ``step``."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(step, self.total) / self.total))

    def _apply(self) -> None:
        value = self.at(self.done)
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def step(self) -> None:
        self.done += 1
        self._apply()


@dataclass
class _Run:
    """The state one :func:`finetune` call carries from step to step and epoch to epoch."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    data: EpochData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    epochs: int
    config: dict[str, Any]
    history: dict[str, list]
    ckpt_path: Path | None
    eval_loader: Iterable | None
    train_kwargs: dict[str, Any]
    checkpoint_every: int | None = None
    ran: list[int] = field(default_factory=list)
    epoch_rng: dict[str, Any] | None = None
    base: dict[str, float] | None = None  # the unfinished epoch's sums restored from a checkpoint
    cosine: tuple[float, int] | None = None  # (peak lr, steps per epoch) with schedule="cosine"

    def epoch(self, epoch0: int, step0: int = 0) -> None:
        """Train the 0-based epoch ``epoch0`` from its step ``step0``, step the schedule, evaluate, record,
        checkpoint (also every ``checkpoint_every`` steps)."""
        epoch = epoch0 + 1
        per_step = None
        if self.cosine is not None:
            peak, per_epoch = self.cosine
            per_step = CosineSteps(self.optimizer, peak, per_epoch * self.epochs, epoch0 * per_epoch + step0)
        epoch_lr = float(self.optimizer.param_groups[0]["lr"] if per_step is None  # cosine: the epoch's first step
                         else per_step.at(epoch0 * per_epoch))
        if step0 == 0:
            self.epoch_rng = rng_state(self.data.loader)
        batches = self.data.epoch(epoch0, step0, self.epoch_rng)
        total = self.data.steps(step0)

        def on_step(b: int, sums: Callable[[], dict[str, float]]) -> None:
            step = step0 + b
            if step % self.checkpoint_every == 0 and step < total:  # the epoch's end is saved below
                self.save(epoch0, step, reduce_sums(sums(), self.base))

        mid = bool(self.checkpoint_every) and self.ckpt_path is not None and total is not None
        stats = train_epoch(self.net, batches, self.optimizer, desc=f"epoch {epoch}/{self.epochs}",
                            on_step=on_step if mid else None, scheduler=per_step, **self.train_kwargs)
        sums, self.base = reduce_sums(stats["sums"], self.base), None
        self.scheduler.step()
        acc = (evaluate(self.model, self.eval_loader, max_batches=self.train_kwargs["max_batches"])
               if self.eval_loader is not None else None)
        self.model.train()
        loss = sums["loss"] / sums["samples"]
        for key, value in (("epoch", epoch), ("train_loss", loss), ("eval_accuracy", acc), ("lr", epoch_lr)):
            self.history[key].append(value)
        self.ran.append(epoch)
        logger.info("epoch %d/%d: train loss %.4f%s, lr %.3g", epoch, self.epochs, loss,
                    "" if acc is None else f", accuracy {acc:.4f}", epoch_lr)
        self.save(epoch, 0, None)

    def save(self, epochs_done: int, step: int, tally: dict[str, float] | None) -> None:
        """Write ``last.pt`` (rank 0 only; nothing without a checkpoint folder): ``epochs_done`` epochs
        and ``step`` steps of the next one."""
        if self.ckpt_path is None or not is_main():
            return
        atomic_save({
            "format": FORMAT, "version": VERSION, "epoch": epochs_done, "step": step, "epochs": self.epochs,
            "config": self.config, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler), "rng": rng_state(self.data.loader),
            "epoch_rng": self.epoch_rng if step else None, "tally": tally, "history": self.history,
            "sampler": self.data.settings, "world": world(),
        }, self.ckpt_path)
        logger.debug("wrote %s (epoch %d, step %d)", self.ckpt_path, epochs_done, step)

    def result(self, start: int, step0: int) -> FinetuneResult:
        h = self.history
        return FinetuneResult(
            epochs=tuple(h["epoch"]), train_loss=tuple(h["train_loss"]), eval_accuracy=tuple(h["eval_accuracy"]),
            lr=tuple(h["lr"]), epochs_run=tuple(self.ran), resumed_from=start, resumed_step=step0,
            checkpoint=str(self.ckpt_path) if self.ckpt_path is not None else None)


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int,
    eval_loader: Iterable | None = None,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    schedule: str = "step",
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    distill_weight: float = DEFAULT_DISTILL_WEIGHT,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    checkpoint_every: int | None = None,
    shard: bool | None = None,
    data_seed: int = 0,
) -> FinetuneResult:
    """Fine-tune ``model`` in place with SGD and a multi-step learning-rate schedule.

    Works on any ``nn.Module``, e.g. the ``torch.fx.GraphModule`` returned by
    :func:`oba_fx.prune_graph`. Each epoch trains over ``train_loader`` (:func:`train_epoch`),
    steps the schedule, evaluates on ``eval_loader`` (top-1 accuracy, :func:`oba_fx.data.evaluate`)
    and, with ``checkpoint_dir``, writes ``last.pt``. See the module documentation for what an
    exact resume needs and for the distillation defaults.

    Args:
        model: The network; trained in place (left in train mode).
        train_loader: Iterable of ``(inputs, targets)`` batches; ``inputs`` may be a tuple of
            positional inputs. A ``DistributedSampler`` gets ``set_epoch`` each epoch.
        epochs: Total number of epochs (including those a resumed checkpoint already has).
        eval_loader: Batches to measure top-1 accuracy on after every epoch.
        lr: Initial learning rate (paper: 1e-3).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: L2 weight decay (paper: 5e-4).
        milestones: Numbers of epochs after which the learning rate is multiplied by ``gamma``
            (with ``[2]`` epochs 1-2 use ``lr`` and epoch 3 on ``lr * gamma``). Default
            ``[epochs // 2, 3 * epochs // 4]`` (non-positive values dropped).
        gamma: The factor applied at each milestone.
        schedule: ``"step"`` (default, the paper's): ``lr`` multiplied by ``gamma`` at the
            ``milestones``, once per epoch. ``"cosine"``: the learning rate of every optimizer step
            falls from ``lr`` to 0 along half a cosine over all the epochs' steps
            (:class:`CosineSteps`; needs a loader with a length; no ``milestones``). The curve spans
            the ``epochs`` of the call, so extending a finished run starts a new, longer one from
            the steps already done (the rate rises again).
            ``benchmarks/finetuned.py`` measured one distilled epoch on pruned ResNet-56 at half the
            FLOPs: cosine from 3e-3 ended level with the constant 1e-3 on exact test images and
            0.7–1.0 points higher on the JPEG test images in each of three seeds.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean loss; default
            cross-entropy (the hard term when distilling).
        teacher: Distil from this network, typically the dense model before pruning
            (:func:`distillation_loss`); it runs in eval mode without gradients on the student's
            device and is never modified. ``None``: plain ``loss_fn``.
        temperature: Distillation temperature ``T`` (default 4).
        distill_weight: Share ``α`` of the distillation term (default 0.9); 0 ignores the teacher.
        checkpoint_dir: Folder for ``last.pt`` (created if absent); none written if ``None``.
        resume: Continue from ``checkpoint_dir/last.pt`` if it exists (else it is overwritten).
        masks: ``{parameter name: 0/1 tensor}``; gradients are masked before, and weights after,
            every optimizer step, so masked weights stay exactly zero (unstructured pruning).
        device: Where to train (the model is moved there); default: the model's device.
        progress: Show a tqdm bar over the batches of each epoch.
        max_batches: Use at most this many batches per epoch, for training and for evaluation.
        checkpoint_every: Also write ``last.pt`` after every this many optimizer steps (global
            steps) inside an epoch, so that an interrupt loses at most that many steps (needs a
            loader with a length). ``None``: at epoch ends only.
        shard: Read the data through a :class:`~oba_fx.finetune_ddp.ShardSampler` (the loader's
            ``batch_size`` is then the global batch, split over the ranks). Default: when a process
            group with more than one rank is initialised, or when resuming a checkpoint written so.
            Pass ``True`` on one process to write checkpoints that resume on any number of ranks.
        data_seed: Seed of the sharded sampler's permutations (``seed + epoch``).

    Returns:
        A :class:`FinetuneResult` with the per-epoch history.

    Raises:
        ValueError: Bad arguments, an empty ``train_loader``, an unusable checkpoint, or a
            teacher whose logits do not match the model's.
        KeyError: A mask names no parameter of the model.
        OSError: ``last.pt`` exists but cannot be read.
        FloatingPointError: The training loss became NaN or infinite.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> loader = DataLoader(TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,))), batch_size=16)
        >>> mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        >>> res = finetune(model, loader, epochs=4, lr=0.1, milestones=[2], progress=False,
        ...                masks={"weight": mask})
        >>> [round(v, 6) for v in res.lr], bool((model.weight[mask == 0] == 0).all())
        ([0.1, 0.1, 0.01, 0.01], True)
        >>> student = torch.nn.Linear(3, 2)
        >>> res = finetune(student, loader, epochs=1, teacher=model, progress=False)  # distil from `model`
        >>> res.epochs_run
        (1,)
    """
    _check_finetune_args(model, epochs, max_batches, teacher, temperature, distill_weight)
    check_data(train_loader, "finetune", reads=epochs)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise BadInputError(f"checkpoint_every is a number of optimizer steps and must be a positive int, got "
                            f"{checkpoint_every!r} (None: at epoch ends only)")
    milestones = _checked_milestones(epochs, milestones, schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInputError("the model has no trainable parameters")
    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else module_device(model)
    mask_list = prepare_masks(model, masks)
    teacher = teacher_on(teacher, dev) if teacher is not None and distill_weight > 0 else None

    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    config: dict[str, Any] = {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                              "milestones": sorted(milestones), "gamma": float(gamma)}
    if teacher is not None:
        config["distill"] = {"temperature": float(temperature), "weight": float(distill_weight)}
    if schedule == "cosine":  # absent for "step", so checkpoints written before the option still match
        config["schedule"] = schedule
    history: dict[str, list] = {"epoch": [], "train_loss": [], "eval_accuracy": [], "lr": []}
    ckpt_path, ckpt = read_checkpoint(checkpoint_dir, resume)
    data = EpochData(train_loader, use_shards(shard, ckpt, ckpt_path), data_seed)
    start, step0, base, epoch_rng = 0, 0, None, None
    if ckpt is not None:
        start, step0, base, epoch_rng = _restore(ckpt, ckpt_path, model, optimizer, scheduler, data, config, history,
                                                 lr, gamma, milestones)
    apply_masks(mask_list)
    net = data_parallel(model, dev)  # after the restore: DDP starts every rank from rank 0's weights
    if net is not model and masks:
        masks = {f"module.{k}": v for k, v in masks.items()}
    if start >= epochs:
        logger.info("%s already has %d epochs done (asked for %d): nothing to run", ckpt_path, start, epochs)
    elif start or step0:
        logger.info("resuming from %s: epoch %d from step %d, to epoch %d", ckpt_path, start + 1, step0 + 1, epochs)
    run = _Run(model, net, data, optimizer, scheduler, epochs, config, history, ckpt_path, eval_loader,
               dict(loss_fn=loss_fn, teacher=teacher, temperature=temperature, distill_weight=distill_weight,
                    masks=masks, device=dev, max_batches=max_batches, progress=progress and is_main()),
               checkpoint_every, epoch_rng=epoch_rng, base=base,
               cosine=(float(lr), _steps_per_epoch(data, max_batches)) if schedule == "cosine" else None)
    for epoch0 in range(start, epochs):
        run.epoch(epoch0, step0 if epoch0 == start else 0)
    return run.result(start, step0)


def _restore_hyperparameters(path: Path, ckpt: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.MultiStepLR, config: dict[str, Any], lr: float,
                             gamma: float, milestones: list[int]) -> None:
    """Apply the current hyperparameters from the checkpoint's next epoch on (with a warning)."""
    done = int(ckpt["epoch"])
    changed = {k: (ckpt["config"].get(k), config.get(k)) for k in sorted(set(ckpt["config"]) | set(config))
               if ckpt["config"].get(k) != config.get(k)}
    logger.warning("resuming %s with other hyperparameters than it was written with (checkpoint, now): %s; "
                   "the current ones apply from epoch %d on", path, changed, done + 1)
    scheduler.milestones = collections.Counter(milestones)
    scheduler.gamma = gamma
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    new_lr = _lr_for_epoch(lr, gamma, milestones, done)
    for group in optimizer.param_groups:
        group.update(lr=new_lr, initial_lr=lr, momentum=config["momentum"], weight_decay=config["weight_decay"])
    scheduler._last_lr = [new_lr for _ in optimizer.param_groups]  # what get_last_lr() reports


def _restore(ckpt: Mapping[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.MultiStepLR, data: EpochData, config: dict[str, Any],
             history: dict[str, list], lr: float, gamma: float, milestones: list[int]
             ) -> tuple[int, int, dict[str, float] | None, dict[str, Any] | None]:
    """Load ``ckpt`` into the training state; returns the epochs done, the steps done in the next one,
    that epoch's sums so far and its starting random states."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise BadInputError(f"the checkpoint {str(path)!r} does not fit this model (another architecture?): {exc}; "
                         "delete it or pass resume=False") from exc
    step = int(ckpt.get("step", 0))
    if step and ckpt.get("sampler") != data.settings:
        raise BadInputError(f"{str(path)!r} was written in the middle of an epoch with the sharded data settings "
                            f"{ckpt.get('sampler')}, this run has {data.settings}; resume with the same batch size "
                            "(the global batch) and data_seed")
    optimizer.load_state_dict(ckpt["optimizer"])
    sched = dict(ckpt["scheduler"])
    sched["milestones"] = collections.Counter(sched["milestones"])
    scheduler.load_state_dict(sched)
    if ckpt["config"] != config:
        _restore_hyperparameters(path, ckpt, optimizer, scheduler, config, lr, gamma, milestones)
    for key in history:
        history[key].extend(ckpt["history"][key])
    set_rng_state(ckpt["rng"], data.loader, str(path))
    if ckpt.get("world", 1) != world():
        logger.info("%s was written by %d rank(s); resuming on %d", path, ckpt.get("world", 1), world())
    return int(ckpt["epoch"]), step, ckpt.get("tally"), ckpt.get("epoch_rng")


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`finetune`.

    ``oba_fx.finetune`` is the public function, but once anything imports the submodule
    ``oba_fx.finetune`` Python binds that name on the package to the module. Making the module
    callable keeps ``oba_fx.finetune(model, loader, epochs=1)`` working either way.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> FinetuneResult:
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
