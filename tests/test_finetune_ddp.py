"""Data-parallel fine-tuning (gloo, CPU): 2 processes train like 1, and a run interrupted in the middle
of an epoch resumes on 1 or 2 processes with nothing lost and nothing repeated.

"Nothing lost, nothing repeated": the updates that reach the final weights are exactly those of an
uninterrupted run. The steps done after the last checkpoint are lost work (redone after the resume),
but every sample enters the surviving updates exactly once per epoch, in the same global batches, so
the final weights equal the uninterrupted run's to float64 round-off.
"""

from __future__ import annotations

import collections
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from oba_fx.checkpoint import CHECKPOINT_NAME
from oba_fx.finetune import finetune

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")

N, GLOBAL_BATCH, EPOCHS, EVERY = 32, 8, 2, 2   # 4 global steps per epoch, a checkpoint every 2 steps


class _Interrupt(Exception):
    pass


class _Recorded(Dataset):
    """A tiny synthetic dataset that records the indices this process reads and stops the run
    (raises) when asked to read its ``stop_at``-th sample."""

    def __init__(self, stop_at: int | None = None):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(N, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (N,), generator=g)
        self.read: list[int] = []
        self.stop_at = stop_at

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        if self.stop_at is not None and len(self.read) + 1 == self.stop_at:
            raise _Interrupt
        self.read.append(int(i))
        return self.x[i], self.y[i]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train(ckpt: str, stop_at: int | None = None, shard: bool | None = None) -> dict:
    """Fine-tune (or resume) into ``ckpt``; returns the weights, history and what this process read."""
    data = _Recorded(stop_at)
    model = _model()
    if os.path.exists(os.path.join(ckpt, CHECKPOINT_NAME)) and stop_at is None:
        model[0].weight.data.add_(1.0)   # the resume must replace these weights by the checkpoint's
    out = {"read": data.read, "interrupted": False}
    try:
        res = finetune(model, DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=True), epochs=EPOCHS, lr=0.1,
                       milestones=[1], checkpoint_dir=ckpt, checkpoint_every=EVERY, shard=shard, progress=False)
        out.update(res=res)
    except _Interrupt:
        out["interrupted"] = True
    out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _worker(rank: int, world: int, port: int, path: str, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({name: _train(ckpt, stop_at) for name, ckpt, stop_at in jobs}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, name: str, jobs: list) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / name)
    mp.start_processes(_worker, args=(2, port, path, jobs), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{path}.{r}", weights_only=False) for r in (0, 1)]


def _same_weights(a: dict, b: dict) -> bool:
    return all(float((a[k] - b[k]).abs().max()) <= 1e-10 * max(1.0, float(b[k].abs().max())) for k in b)


def _committed(runs: list[dict], ckpt: str, per_step: int) -> list[int]:
    """What the interrupted processes read for the updates their last checkpoint holds."""
    saved = torch.load(os.path.join(ckpt, CHECKPOINT_NAME), weights_only=True)
    steps = saved["epoch"] * (N // GLOBAL_BATCH) + saved["step"]
    return [i for run in runs for i in run["read"][:steps * per_step]]


def _each_sample_epochs_times(reads: list[int]) -> bool:
    return collections.Counter(reads) == {i: EPOCHS for i in range(N)}


@pytest.mark.slow
def test_two_processes_train_like_one_and_interrupted_runs_resume_on_either(tmp_path):
    d = {k: str(tmp_path / k) for k in ("one", "two", "two_cut", "one_cut")}
    one = _train(d["one"], shard=True)
    # 1 process stopped while reading step 4 of epoch 1 (8 samples a step); last checkpoint after step 2
    one_cut = _train(d["one_cut"], stop_at=8 * 3 + 1, shard=True)
    one_committed = _committed([one_cut], d["one_cut"], 8)
    # 2 processes: a whole run; one stopped while reading step 4 of epoch 2 (4 samples a step each), its last
    # checkpoint after step 2 of epoch 2, so step 3 is lost work; and the 1-process run above resumed
    ranks = _spawn(tmp_path, "a", [("two", d["two"], None), ("two_cut", d["two_cut"], 4 * 7 + 1),
                                   ("one_cut", d["one_cut"], None)])
    two, two_cut, resumed_on_two = ([r[k] for r in ranks] for k in ("two", "two_cut", "one_cut"))
    saved = torch.load(os.path.join(d["two_cut"], CHECKPOINT_NAME), weights_only=True)
    assert all(r["interrupted"] for r in two_cut) and (saved["epoch"], saved["step"], saved["world"]) == (1, 2, 2)
    two_committed = _committed(two_cut, d["two_cut"], 4)
    resumed_on_one = _train(d["two_cut"])                 # shard=None: the checkpoint says how the data was read

    for got in (*two, resumed_on_one, *resumed_on_two):
        assert _same_weights(got["weights"], one["weights"])
        assert got["res"].epochs == (1, 2)
        assert all(abs(a - b) <= 1e-10 * abs(b) for a, b in zip(got["res"].train_loss, one["res"].train_loss))
    assert (resumed_on_one["res"].resumed_from, resumed_on_one["res"].resumed_step) == (1, 2)
    assert (resumed_on_two[0]["res"].resumed_from, resumed_on_two[0]["res"].resumed_step) == (0, 2)
    assert _each_sample_epochs_times(one["read"])
    assert _each_sample_epochs_times(two[0]["read"] + two[1]["read"])
    assert _each_sample_epochs_times(two_committed + resumed_on_one["read"])
    assert _each_sample_epochs_times(one_committed + resumed_on_two[0]["read"] + resumed_on_two[1]["read"])


def test_a_loader_used_as_given_resumes_mid_epoch_by_replaying_its_order(tmp_path):
    """Without sharding, the resumed epoch redraws the loader's order from the epoch's starting random
    states and drops the batches already trained: the weights equal an uninterrupted run's."""
    def run(ckpt, stop_at=None):
        data, model = _Recorded(stop_at), _model()
        loader = DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=True, generator=torch.Generator().manual_seed(5))
        try:
            finetune(model, loader, epochs=EPOCHS, lr=0.1, checkpoint_dir=ckpt, checkpoint_every=EVERY, progress=False)
        except _Interrupt:
            pass
        return model.state_dict()

    whole = run(str(tmp_path / "whole"))
    run(str(tmp_path / "cut"), stop_at=8 * 7 + 1)         # stopped in epoch 2, step 4; saved after its step 2
    assert torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)["step"] == 2
    assert _same_weights(run(str(tmp_path / "cut")), whole)


def test_cli_refuses_a_batch_that_the_ranks_cannot_share_before_any_work(capsys, monkeypatch):
    from oba_fx.cli import main

    monkeypatch.setattr("oba_fx.cli._ranks", lambda device="auto": __import__("contextlib").nullcontext())
    monkeypatch.setenv("WORLD_SIZE", "3")   # as torchrun would set it (the group itself is not joined here)
    code = main(["prune", "--finetune-epochs", "1", "--batch-size", "64", "--data", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 64" in err and "3 ranks" in err and "--batch-size 63" in err


def test_cli_checkpoint_every_must_be_positive(capsys):
    from oba_fx.cli import main

    code = main(["prune", "--finetune-epochs", "1", "--checkpoint-every", "0", "--data", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 2 and "--checkpoint-every" in err and "nonexistent" not in err


def test_sharded_loader_refuses_a_batch_the_ranks_cannot_share():
    from oba_fx.errors import BadInputError
    from oba_fx.finetune_ddp import sharded_loader

    with pytest.raises(BadInputError, match=r"batch size 6 .* multiple of the 4 ranks; use e.g. batch_size=4"):
        sharded_loader(DataLoader(_Recorded(), batch_size=6), world_size=4, rank_=0)


def _cut(ckpt: str, batch_size: int = GLOBAL_BATCH, shard: bool | None = None) -> None:
    """A 1-process run stopped in epoch 1, step 4 (last checkpoint after step 2)."""
    try:
        finetune(_model(), DataLoader(_Recorded(batch_size * 3 + 1), batch_size=batch_size, shuffle=True), epochs=1,
                 lr=0.1, checkpoint_dir=ckpt, checkpoint_every=EVERY, shard=shard, progress=False)
    except _Interrupt:
        pass


def test_a_mid_epoch_checkpoint_of_a_loader_used_as_given_refuses_to_resume_sharded(tmp_path):
    from oba_fx.errors import BadInputError

    _cut(str(tmp_path))
    with pytest.raises(BadInputError, match=r"middle of epoch 1 by a run that did not shard .* shard=False"):
        finetune(_model(), DataLoader(_Recorded(), batch_size=GLOBAL_BATCH), epochs=1, checkpoint_dir=str(tmp_path),
                 shard=True, progress=False)


def test_a_sharded_mid_epoch_checkpoint_refuses_another_global_batch(tmp_path):
    from oba_fx.errors import BadInputError

    _cut(str(tmp_path), shard=True)
    with pytest.raises(BadInputError, match=r"same batch size \(the global batch\)"):
        finetune(_model(), DataLoader(_Recorded(), batch_size=4), epochs=1, checkpoint_dir=str(tmp_path),
                 progress=False)
