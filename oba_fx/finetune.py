"""Fine-tuning after pruning, with the OBA paper's recipe as defaults, checkpoints and exact resume.

The recipe (OBA paper, CIFAR): SGD with momentum 0.9, learning rate 1e-3, weight decay 5e-4,
batches of 64 (the loader's choice), the learning rate multiplied by ``gamma = 0.1`` at the
milestones ``[epochs // 2, 3 * epochs // 4]``.

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
  ``masks`` and hyperparameters. Only ``epochs`` may grow (to extend a finished run); note that
  the default milestones depend on ``epochs``, so pass ``milestones`` explicitly when extending.
  If the hyperparameters differ from the checkpoint's, the current ones are used from the next
  epoch on and a warning is logged.

The checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``.

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
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .batches import module_device
from .evaluate import evaluate
from .io import atomic_save

__all__ = ["CHECKPOINT_NAME", "FinetuneResult", "finetune"]

logger = logging.getLogger(__name__)

#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
_FORMAT = "oba_fx.finetune"
_VERSION = 1


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did: the whole history, including epochs restored from a checkpoint.

    Attributes:
        epochs: 1-based numbers of the epochs in the history (all done so far).
        train_loss: Mean training loss of each epoch (per sample).
        eval_accuracy: Top-1 accuracy on ``eval_loader`` after each epoch (``None`` without one).
        lr: Learning rate used in each epoch.
        epochs_run: The epochs this call ran (the rest came from the checkpoint).
        resumed_from: Epochs already done when this call started (0: a fresh run).
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

    @property
    def final_accuracy(self) -> float | None:
        """Accuracy after the last epoch (``None`` if never evaluated)."""
        return self.eval_accuracy[-1] if self.eval_accuracy else None

    @property
    def best_accuracy(self) -> float | None:
        """Best accuracy over the epochs (``None`` if never evaluated)."""
        accs = [a for a in self.eval_accuracy if a is not None]
        return max(accs) if accs else None


# ----------------------------------------------------------------------------------------------
# helpers




def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _batch_size(y: Any) -> int:
    if isinstance(y, torch.Tensor) and y.dim() > 0:
        return int(y.shape[0])
    if isinstance(y, (list, tuple)) and y:
        return _batch_size(y[0])
    return 1


def _loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """The torch generators that drive the loader's order (deduplicated, by role)."""
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (
        ("loader", getattr(loader, "generator", None)),
        ("sampler", getattr(getattr(loader, "sampler", None), "generator", None)),
        ("batch_sampler.sampler", getattr(getattr(batch_sampler, "sampler", None), "generator", None)),
    )
    for role, g in candidates:
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            found[role] = g
    return found


def _rng_state(loader: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # NumPy's key array as a plain list, so that the checkpoint loads with weights_only=True.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "loader": {role: g.get_state() for role, g in _loader_generators(loader).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], loader: Any, where: str) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            logger.warning("%s: saved CUDA RNG states for %d devices, %d visible: not restored",
                           where, len(state["cuda"]), torch.cuda.device_count())
    gens = _loader_generators(loader)
    saved = state.get("loader", {})
    for role, g in gens.items():
        if role in saved:
            g.set_state(saved[role])
    if set(gens) != set(saved):
        logger.warning(
            "%s: the checkpoint has loader generators %s, this loader %s; the data order of the "
            "resumed run may differ from an uninterrupted one", where, sorted(saved), sorted(gens))


def _scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    sd = dict(scheduler.state_dict())
    sd["milestones"] = dict(sd["milestones"])  # a Counter; a plain dict loads with weights_only=True
    return sd


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "unreadable"
        raise OSError(f"cannot read the fine-tuning checkpoint {str(path)!r} (truncated or corrupt?): {exc}; "
                      "delete it or pass resume=False to start afresh") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not an oba_fx fine-tuning checkpoint; delete it or pass resume=False")
    if ckpt.get("version", 0) > _VERSION:
        raise ValueError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this oba_fx reads "
                         f"version {_VERSION} or older")
    return ckpt


def _prepare_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None
                   ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    if not masks:
        return []
    params = dict(model.named_parameters())
    out = []
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r}, which is not a parameter of the model; parameters are e.g. "
                           f"{sorted(params)[:8]}")
        p = params[name]
        mask = torch.as_tensor(mask)
        if mask.shape != p.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(p.shape)}")
        out.append((p, mask.to(device=p.device, dtype=p.dtype)))
    return out


@torch.no_grad()
def _apply_masks(masks: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for p, m in masks:
        p.mul_(m)


def _lr_for_epoch(lr: float, gamma: float, milestones: list[int], epoch0: int) -> float:
    """Learning rate of the 0-based epoch ``epoch0`` under a multi-step schedule."""
    return lr * gamma ** sum(1 for m in milestones if m <= epoch0)


# ----------------------------------------------------------------------------------------------
# the loop


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
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place with SGD and a multi-step learning-rate schedule.

    Works on any ``nn.Module``, e.g. the ``torch.fx.GraphModule`` returned by
    :func:`oba_fx.prune_graph`. Each epoch trains over ``train_loader``, steps the schedule,
    evaluates on ``eval_loader`` (top-1 accuracy, :func:`oba_fx.data.evaluate`) and, with
    ``checkpoint_dir``, writes ``last.pt``. See the module documentation for what an exact resume
    needs.

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
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean loss; default
            cross-entropy.
        checkpoint_dir: Folder for ``last.pt`` (created if absent); none written if ``None``.
        resume: Continue from ``checkpoint_dir/last.pt`` if it exists (else it is overwritten).
        masks: ``{parameter name: 0/1 tensor}``; gradients are masked before, and weights after,
            every optimizer step, so masked weights stay exactly zero (unstructured pruning).
        device: Where to train (the model is moved there); default: the model's device.
        progress: Show a tqdm bar over the batches of each epoch.
        max_batches: Use at most this many batches per epoch, for training and for evaluation.

    Returns:
        A :class:`FinetuneResult` with the per-epoch history.

    Raises:
        ValueError: Bad arguments, an empty ``train_loader``, or an unusable checkpoint.
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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive, got {max_batches}")
    if milestones is None:
        milestones = [m for m in (epochs // 2, 3 * epochs // 4) if m > 0]
    else:
        milestones = [int(m) for m in milestones]
        if any(m < 1 for m in milestones):
            raise ValueError(f"milestones are numbers of epochs after which the LR decays; they must be >= 1, "
                             f"got {milestones}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")

    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else module_device(model)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    mask_list = _prepare_masks(model, masks)

    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    config = {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
              "milestones": sorted(milestones), "gamma": float(gamma)}
    history: dict[str, list] = {"epoch": [], "train_loss": [], "eval_accuracy": [], "lr": []}

    ckpt_path: Path | None = None
    start = 0
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        ckpt_path = folder / CHECKPOINT_NAME
        if ckpt_path.exists() and resume:
            start = _restore(ckpt_path, model, optimizer, scheduler, train_loader, config, history,
                             lr, gamma, milestones)
        elif ckpt_path.exists():
            logger.warning("resume=False: starting afresh; %s will be overwritten", ckpt_path)

    _apply_masks(mask_list)
    if start >= epochs:
        logger.info("%s already has %d epochs done (asked for %d): nothing to run", ckpt_path, start, epochs)
    elif start:
        logger.info("resuming from %s: epochs %d-%d of %d", ckpt_path, start + 1, epochs, epochs)

    run: list[int] = []
    for epoch0 in range(start, epochs):
        epoch = epoch0 + 1
        epoch_lr = float(optimizer.param_groups[0]["lr"])
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch0)
        model.train()
        total, seen, n_batches = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False,
                   total=_len_or_none(train_loader, max_batches))
        try:
            for i, batch in enumerate(bar):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _to_device(batch[0], dev), _to_device(batch[1], dev)
                out = model(*x) if isinstance(x, (tuple, list)) else model(x)
                loss = loss_fn(out, y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"training loss is {value} at epoch {epoch}, batch {i + 1}; "
                                             "lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if mask_list:
                    with torch.no_grad():
                        for p, m in mask_list:
                            if p.grad is not None:
                                p.grad.mul_(m)
                optimizer.step()
                _apply_masks(mask_list)
                bs = _batch_size(y)
                total += value * bs
                seen += bs
                n_batches += 1
                if progress and n_batches % 10 == 0:
                    bar.set_postfix(loss=f"{total / seen:.4f}")
        finally:
            bar.close()
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches")
        scheduler.step()
        acc = evaluate(model, eval_loader, max_batches=max_batches) if eval_loader is not None else None
        model.train()
        history["epoch"].append(epoch)
        history["train_loss"].append(total / seen)
        history["eval_accuracy"].append(acc)
        history["lr"].append(epoch_lr)
        run.append(epoch)
        logger.info("epoch %d/%d: train loss %.4f%s, lr %.3g", epoch, epochs, total / seen,
                    "" if acc is None else f", accuracy {acc:.4f}", epoch_lr)
        if ckpt_path is not None and _is_main_process():
            atomic_save({
                "format": _FORMAT, "version": _VERSION, "epoch": epoch, "epochs": epochs,
                "config": config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": _scheduler_state(scheduler), "rng": _rng_state(train_loader),
                "history": history,
            }, ckpt_path)
            logger.debug("wrote %s (epoch %d)", ckpt_path, epoch)

    return FinetuneResult(
        epochs=tuple(history["epoch"]), train_loss=tuple(history["train_loss"]),
        eval_accuracy=tuple(history["eval_accuracy"]), lr=tuple(history["lr"]), epochs_run=tuple(run),
        resumed_from=start, checkpoint=str(ckpt_path) if ckpt_path is not None else None)


def _len_or_none(loader: Any, max_batches: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.MultiStepLR, loader: Any, config: dict[str, Any],
             history: dict[str, list], lr: float, gamma: float, milestones: list[int]) -> int:
    """Load ``path`` into the training state; returns the number of epochs done."""
    ckpt = _load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint {str(path)!r} does not fit this model (another architecture?): {exc}; "
                         "delete it or pass resume=False") from exc
    optimizer.load_state_dict(ckpt["optimizer"])
    sched = dict(ckpt["scheduler"])
    sched["milestones"] = collections.Counter(sched["milestones"])
    scheduler.load_state_dict(sched)
    done = int(ckpt["epoch"])
    if ckpt["config"] != config:
        changed = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
        logger.warning("resuming %s with other hyperparameters than it was written with (checkpoint, now): %s; "
                       "the current ones apply from epoch %d on", path, changed, done + 1)
        scheduler.milestones = collections.Counter(milestones)
        scheduler.gamma = gamma
        scheduler.base_lrs = [lr for _ in optimizer.param_groups]
        new_lr = _lr_for_epoch(lr, gamma, milestones, done)
        for group in optimizer.param_groups:
            group.update(lr=new_lr, initial_lr=lr, momentum=config["momentum"],
                         weight_decay=config["weight_decay"])
        scheduler._last_lr = [new_lr for _ in optimizer.param_groups]  # what get_last_lr() reports
    for key in history:
        history[key].extend(ckpt["history"][key])
    _set_rng_state(ckpt["rng"], loader, str(path))
    return done
