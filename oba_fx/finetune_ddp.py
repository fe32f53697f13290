"""Data-parallel fine-tuning: a resumable sharded sampler, the loader built on it, the DDP wrapper.

**The global batch.** The training loader's ``batch_size`` is the *global* batch ``G``: with ``W``
ranks each rank reads ``G / W`` samples per step and :class:`~torch.nn.parallel.DistributedDataParallel`
averages the gradients, so one step updates the weights with the mean gradient over the same ``G``
samples whatever ``W`` is (exactly for a model without BatchNorm in train mode; BatchNorm
normalises with each rank's own batch statistics). ``G`` must be a multiple of ``W``.

**The order.** Epoch ``e`` visits the samples in the order ``randperm(N)`` drawn from a generator
seeded with ``seed + e`` (``0 .. N-1`` without shuffling); global step ``s`` takes positions
``[s·G, (s+1)·G)`` of it and rank ``r`` the positions ``≡ r (mod W)`` among them. The order does
not depend on ``W``, so a run can stop after any step and continue on another number of ranks:
the *position* ``s·G`` is all the sampler needs (:attr:`ShardSampler.start`). With ``N`` not a
multiple of ``W`` the last ``N mod W`` positions of each epoch are skipped so that every rank runs
the same number of steps (a collective waits for all of them).

Example:
    >>> s = ShardSampler(range(10), num_replicas=2, rank=1, shuffle=False)
    >>> list(s)
    [1, 3, 5, 7, 9]
    >>> s.start = 4; list(s), len(s)      # resume after 4 samples (e.g. 2 steps of G = 2)
    ([5, 7, 9], 3)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from . import distributed
from .batches import length
from .checkpoint import rng_state, set_rng_state
from .distributed import active, sum_numbers
from .errors import BadInputError

__all__ = ["EpochData", "ShardSampler", "data_parallel", "reduce_sums", "replay", "sharded_loader", "use_shards"]

logger = logging.getLogger(__name__)


class ShardSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` whose order does not depend on the number of
    ranks and which can start in the middle of an epoch (see the module documentation).

    Args:
        dataset: Anything with a length.
        num_replicas: Number of ranks ``W`` (default: the process group's).
        rank: This rank (default: the process group's).
        shuffle: Draw a new permutation every epoch (seeded with ``seed + epoch``).
        seed: Seed of the permutations; the same on every rank.
        drop_last_batch: With the global batch ``global_batch``: leave out an incomplete last
            global batch (the loader's ``drop_last``).
        global_batch: Samples per global step (only used with ``drop_last_batch``).

    Attributes:
        start: Position in the epoch's order where iteration begins (a multiple of ``W``); set it
            after :meth:`set_epoch` to resume, it is reset to 0 by the next :meth:`set_epoch`.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last_batch: bool = False, global_batch: int = 1) -> None:
        num_replicas = distributed.world() if num_replicas is None else num_replicas
        rank = distributed.rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.drop_last_batch, self.global_batch = drop_last_batch, global_batch
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order from its beginning."""
        super().set_epoch(epoch)
        self.start = 0

    def usable(self) -> int:
        """Positions of the epoch that are read (all ranks together)."""
        n = len(self.dataset)
        if self.drop_last_batch:
            n -= n % self.global_batch
        return n - n % self.num_replicas

    def order(self) -> list[int]:
        """The epoch's order (all ranks), before ``start`` and the rank are applied."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.start % self.num_replicas:
            raise BadInputError(f"ShardSampler.start must be a multiple of the {self.num_replicas} ranks, "
                                f"got {self.start}")
        return iter(self.order()[self.start + self.rank:self.usable():self.num_replicas])

    def __len__(self) -> int:
        return max(self.usable() - self.start, 0) // self.num_replicas


def _shuffles(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return True
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    raise BadInputError(
        f"cannot shard a training loader with a {type(sampler).__name__} over the ranks: data-parallel fine-tuning "
        "builds its own DistributedSampler from the loader's dataset; pass a DataLoader with shuffle=True/False "
        "and no sampler")


def sharded_loader(loader: Any, seed: int = 0, world_size: int | None = None,
                   rank_: int | None = None) -> tuple[DataLoader, dict[str, Any]]:
    """A DataLoader over ``loader``'s dataset that reads this rank's share of every global batch.

    Args:
        loader: A :class:`~torch.utils.data.DataLoader` with a ``batch_size`` (the global batch,
            a multiple of the number of ranks) and a random or sequential sampler.
        seed: Seed of the epochs' permutations (:class:`ShardSampler`).
        world_size: Number of ranks (default: the process group's).
        rank_: This rank (default: the process group's).

    Returns:
        The loader (its ``sampler`` a :class:`ShardSampler`) and the settings a checkpoint keeps.

    Raises:
        BadInputError: ``loader`` is not a DataLoader with a batch size, its batch size is not a
            multiple of the number of ranks, or its sampler cannot be sharded.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> dl = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, shuffle=True)
        >>> mine, settings = sharded_loader(dl, world_size=2, rank_=0)
        >>> mine.batch_size, len(mine), settings["global_batch"]
        (2, 2, 4)
    """
    w = distributed.world() if world_size is None else world_size
    r = distributed.rank() if rank_ is None else rank_
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise BadInputError(
            f"data-parallel fine-tuning needs a torch DataLoader with a batch_size (its dataset is sharded over "
            f"the {w} ranks), got {type(loader).__name__}; wrap the data in a Dataset and a DataLoader")
    shuffle = _shuffles(loader)
    g = loader.batch_size
    if g % w:
        raise BadInputError(f"the training batch size {g} is the global batch and must be a multiple of the {w} "
                            f"ranks; use e.g. batch_size={max(w, g - g % w)}")
    sampler = ShardSampler(loader.dataset, num_replicas=w, rank=r, shuffle=shuffle, seed=seed,
                           drop_last_batch=loader.drop_last, global_batch=g)
    out = DataLoader(loader.dataset, batch_size=g // w, sampler=sampler, num_workers=loader.num_workers,
                     collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                     generator=torch.Generator().manual_seed(seed), persistent_workers=loader.persistent_workers
                     if loader.num_workers > 0 else False)
    dropped = len(loader.dataset) - sampler.usable()
    if dropped:
        logger.info("sharded training data: %d of %d samples per epoch are left out (the last, incomplete global "
                    "batch or the remainder modulo %d ranks)", dropped, len(loader.dataset), w)
    return out, {"seed": int(seed), "shuffle": shuffle, "global_batch": g, "drop_last": bool(loader.drop_last)}


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` under a process
    group with more than one rank (rank 0's weights are broadcast to all); else ``model`` itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids)


def reduce_sums(tally: dict[str, float], base: dict[str, float] | None = None) -> dict[str, float]:
    """The epoch's running sums over all ranks (one collective), plus ``base`` (restored from a
    checkpoint: already summed over the ranks).

    Example:
        >>> reduce_sums({"loss": 1.0, "samples": 4}, {"loss": 0.5, "samples": 2})
        {'loss': 1.5, 'samples': 6.0}
    """
    keys = sorted(tally)
    summed = dict(zip(keys, sum_numbers([tally[k] for k in keys])))
    return {k: summed[k] + (base or {}).get(k, 0.0) for k in keys}


def use_shards(shard: bool | None, ckpt: Mapping[str, Any] | None, path: Path | None) -> bool:
    """Whether the run reads the data through a :class:`~oba_fx.finetune_ddp.ShardSampler`."""
    was = ckpt is not None and ckpt.get("sampler") is not None
    use = (active() or was) if shard is None else bool(shard)
    if ckpt is not None and ckpt.get("step", 0) and use != was:
        raise BadInputError(
            f"{str(path)!r} was written in the middle of epoch {int(ckpt['epoch']) + 1} by a run that "
            f"{'sharded' if was else 'did not shard'} its data; the rest of that epoch can only be read the same "
            f"way: resume with shard={was} (a run that did not shard resumes on one process)")
    return use


class EpochData:
    """The training batches of each epoch: the loader as given, or this rank's share of every global
    batch (:func:`~oba_fx.finetune_ddp.sharded_loader`), from any step of the epoch."""

    def __init__(self, loader: Iterable, shard: bool, seed: int) -> None:
        self.loader, self.settings = sharded_loader(loader, seed) if shard else (loader, None)

    def epoch(self, epoch0: int, step0: int, epoch_rng: Mapping[str, Any] | None) -> Iterable:
        """Epoch ``epoch0``'s batches after its first ``step0`` steps."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch0)
        if step0 == 0:
            return self.loader
        if self.settings is not None:
            sampler.start = step0 * self.settings["global_batch"]
            return self.loader
        return replay(self.loader, step0, epoch_rng, rng_state(self.loader))

    def steps(self, step0: int) -> int | None:
        """Steps in the whole epoch when the loader has a length (``step0`` of them already done)."""
        n = length(self.loader)
        return None if n is None else step0 + n


def replay(loader: Iterable, skip: int, epoch_rng: Mapping[str, Any], now: Mapping[str, Any]) -> Iterable:
    """A loader used as given, resumed after ``skip`` batches: its order (and augmentation) is redrawn
    from the random states at the epoch's start, the first ``skip`` batches are drawn and dropped, then
    the states of the checkpoint are restored."""
    set_rng_state(epoch_rng, loader, "mid-epoch resume")
    it = iter(loader)
    for _ in range(skip):
        next(it, None)
    set_rng_state(now, loader, "mid-epoch resume")
    yield from it
