"""Data parallelism over ``torch.distributed``: shard the calibration batches, add up statistics.

When a process group is initialised (``torchrun``, or ``torch.distributed.init_process_group``)
with more than one rank, every stage that reads data takes its share of the batches (batch ``i``
goes to rank ``i mod world``) and the statistics it accumulates are summed over the ranks
(``all_reduce``): per-unit scores, the compensation's ``XᵀX`` / ``XᵀY``, the ``"obs"`` second
moments and BatchNorm statistics. Every rank then takes the same decisions and builds the same
slimmed network. Without a process group (or with one rank) every function here is the identity.

Example:
    >>> list(shard(range(5)))             # one process: every batch
    [0, 1, 2, 3, 4]
    >>> import torch
    >>> all_reduce_sum(torch.ones(2))     # one process: unchanged
    tensor([1., 1.])
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints tables and progress bars and writes files (rank 0)."""
    return rank() == 0


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share: item ``i`` goes to rank ``i mod world``."""
    r, w = rank(), world()
    for i, item in enumerate(items):
        if i % w == r:
            yield item


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place when it is reduced; returned either way)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_number(x: float) -> float:
    """A Python number summed over the ranks (float64)."""
    if not active():
        return x
    return float(all_reduce_sum(torch.tensor([float(x)], dtype=torch.float64, device=comm_device())).item())


def sum_numbers(xs: list[float]) -> list[float]:
    """Python numbers summed over the ranks element-wise, in one collective (float64).

    Example:
        >>> sum_numbers([1.0, 2.5])   # one process: unchanged
        [1.0, 2.5]
    """
    if not active():
        return [float(x) for x in xs]
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=comm_device())
    return [float(v) for v in all_reduce_sum(t).cpu()]


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; tensors travel as CPU tensors).

    Example:
        >>> broadcast_object({"epoch": 3})   # one process: unchanged
        {'epoch': 3}
    """
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]
