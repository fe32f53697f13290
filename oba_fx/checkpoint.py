"""The fine-tuning checkpoint: what ``last.pt`` holds, how it is read, and the random-number states.

A checkpoint is a dict of tensors and plain Python values (it loads with
``torch.load(..., weights_only=True)``):

* ``format``/``version``: ``"oba_fx.finetune"``, :data:`VERSION` (version 1 files, which have no
  ``step``, still load);
* ``epoch``: epochs finished; ``step``: optimizer steps finished in the next epoch (0 at an epoch
  end). A step is one *global* batch: with several ranks, one batch of every rank;
* ``model``, ``optimizer``, ``scheduler``, ``config``, ``history``;
* ``rng``: the random-number states now (torch, Python, NumPy, CUDA, the loader's generators);
  ``epoch_rng``: the states when the unfinished epoch began (mid-epoch checkpoints only);
* ``tally``: the unfinished epoch's running sums over all ranks (loss, samples, hits, batches);
* ``sampler``: ``None`` for a loader used as given, or the sharded sampler's settings
  (``seed``, ``shuffle``, ``global_batch``, ``drop_last``) and ``world`` (ranks that wrote it).

Example:
    >>> import io, torch
    >>> state = rng_state(None)
    >>> sorted(k for k in state if k != "cuda")
    ['loader', 'numpy', 'python', 'torch']
    >>> buf = io.BytesIO(); torch.save(state, buf); _ = buf.seek(0)
    >>> set_rng_state(torch.load(buf, weights_only=True), None, "example")   # loads without pickle
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .distributed import broadcast_object, is_main
from .errors import BadFileError, BadInputError, one_line

__all__ = ["CHECKPOINT_NAME", "FORMAT", "VERSION", "load_checkpoint", "loader_generators", "read_checkpoint", "rng_state",
           "scheduler_state", "set_rng_state"]

logger = logging.getLogger(__name__)

#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "last.pt"
FORMAT = "oba_fx.finetune"
#: 2: mid-epoch steps, tally, sampler (version 1: epoch ends only).
VERSION = 2


def loader_generators(loader: Any) -> dict[str, torch.Generator]:
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


def rng_state(loader: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # NumPy's key array as a plain list, so that the checkpoint loads with weights_only=True.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "loader": {role: g.get_state() for role, g in loader_generators(loader).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], loader: Any, where: str) -> None:
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
    gens = loader_generators(loader)
    saved = state.get("loader", {})
    for role, g in gens.items():
        if role in saved:
            g.set_state(saved[role])
    if set(gens) != set(saved):
        logger.warning(
            "%s: the checkpoint has loader generators %s, this loader %s; the data order of the "
            "resumed run may differ from an uninterrupted one", where, sorted(saved), sorted(gens))


def scheduler_state(scheduler: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    sd = dict(scheduler.state_dict())
    sd["milestones"] = dict(sd["milestones"])  # a Counter; a plain dict loads with weights_only=True
    return sd


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "unreadable"
        raise BadFileError(f"cannot read the fine-tuning checkpoint {str(path)!r} (truncated or corrupt?): "
                           f"{one_line(exc)}; delete it or pass resume=False to start afresh") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BadInputError(f"{str(path)!r} is not an oba_fx fine-tuning checkpoint; delete it or pass resume=False")
    if ckpt.get("version", 0) > VERSION:
        raise BadInputError(f"{str(path)!r} has checkpoint version {ckpt.get('version')}; this oba_fx reads "
                         f"version {VERSION} or older")
    return ckpt


def read_checkpoint(checkpoint_dir: str | os.PathLike | None, resume: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint path (``None`` without a folder) and, to resume, its contents. Rank 0 reads the file
    and sends it to every rank (the folder need only be visible to rank 0); an error is raised on all."""
    if checkpoint_dir is None:
        return None, None
    path = Path(checkpoint_dir).expanduser() / CHECKPOINT_NAME
    found, error = None, None
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and resume:
            try:
                found = load_checkpoint(path)
            except (OSError, ValueError) as exc:
                error = exc
        elif path.exists():
            logger.warning("resume=False: starting afresh; %s will be overwritten", path)
    found, error = broadcast_object((found, error))
    if error is not None:
        raise error
    return path, found
