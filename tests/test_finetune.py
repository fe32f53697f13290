"""``oba_fx.finetune.finetune``: the training loop, its schedule, masks, checkpoints and exact resume.

Tiny models on a synthetic learnable task (labels = argmax of a fixed linear map of the inputs).
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import oba_fx
from _oracle import one_thread  # noqa: F401 (autouse fixture: one torch thread on the shared cores)
from oba_fx.finetune import CHECKPOINT_NAME, FinetuneResult, finetune


def task(n: int = 256, d: int = 8, k: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, k, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def loader(ds: TensorDataset, seed: int = 0, batch_size: int = 32) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Dropout draws from torch's global RNG: exact resume must restore it.
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


class Crash(Exception):
    pass


def crashing_loss(after_calls: int):
    calls = [0]
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, y):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Crash(f"simulated crash at call {calls[0]}")
        return ce(out, y)

    return loss_fn


def test_loss_goes_down_and_accuracy_is_recorded():
    ds = task()
    res = finetune(mlp(), loader(ds), epochs=3, lr=0.1, milestones=[], eval_loader=DataLoader(ds, batch_size=64),
                   progress=False)
    assert isinstance(res, FinetuneResult)
    assert res.epochs == res.epochs_run == (1, 2, 3) and res.resumed_from == 0 and res.checkpoint is None
    assert res.train_loss[2] < res.train_loss[1] < res.train_loss[0]
    assert len(res.eval_accuracy) == 3 and all(0.0 <= a <= 1.0 for a in res.eval_accuracy)
    assert res.eval_accuracy[-1] > 0.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.epochs = ()  # type: ignore[misc]


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    ds = task()
    kw = dict(epochs=4, lr=0.05, milestones=[2, 3], progress=False)
    ref_model = mlp()
    ref = finetune(ref_model, loader(ds), **kw)

    ckpt = tmp_path / "ckpt"
    batches_per_epoch = len(loader(ds))
    with pytest.raises(Crash):  # dies in the middle of epoch 3
        finetune(mlp(), loader(ds), checkpoint_dir=ckpt, loss_fn=crashing_loss(2 * batches_per_epoch + 3), **kw)
    assert (ckpt / CHECKPOINT_NAME).is_file()
    assert torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2

    torch.manual_seed(12345)  # a restarted process would have some other global RNG state
    model = mlp()
    res = finetune(model, loader(ds), checkpoint_dir=ckpt, **kw)
    assert res.resumed_from == 2
    assert res.epochs_run == (3, 4)
    assert res.epochs == (1, 2, 3, 4)
    assert res.lr == pytest.approx(ref.lr)
    assert res.train_loss == ref.train_loss
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(a, b), name
    # Nothing but last.pt in the folder (temporary files are renamed or removed).
    assert os.listdir(ckpt) == [CHECKPOINT_NAME]


def test_extending_a_finished_run_equals_one_long_run(tmp_path):
    ds = task()
    kw = dict(lr=0.05, milestones=[3], progress=False, eval_loader=DataLoader(ds, batch_size=128))
    ref_model = mlp()
    ref = finetune(ref_model, loader(ds), epochs=4, **kw)
    first = finetune(mlp(), loader(ds), epochs=2, checkpoint_dir=tmp_path, **kw)
    assert first.epochs_run == (1, 2)
    model = mlp()
    res = finetune(model, loader(ds), epochs=4, checkpoint_dir=tmp_path, **kw)
    assert res.epochs_run == (3, 4) and res.epochs == (1, 2, 3, 4)
    assert res.eval_accuracy == ref.eval_accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    # Asking again for 4 epochs runs nothing and returns the history.
    again = finetune(mlp(), loader(ds), epochs=4, checkpoint_dir=tmp_path, **kw)
    assert again.epochs_run == () and again.epochs == (1, 2, 3, 4)


def test_resume_false_starts_afresh(tmp_path):
    ds = task(n=64)
    finetune(mlp(), loader(ds), epochs=1, checkpoint_dir=tmp_path, progress=False)
    res = finetune(mlp(), loader(ds), epochs=1, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert res.epochs_run == (1,) and res.resumed_from == 0


def test_masks_stay_zero():
    ds = task()
    model = mlp()
    w = model[0].weight
    mask = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    before = w.detach().clone()
    finetune(model, loader(ds), epochs=2, lr=0.1, masks={"0.weight": mask}, progress=False)
    assert torch.all(model[0].weight[mask == 0] == 0)
    assert not torch.equal(model[0].weight[mask == 1], before[mask == 1])


def test_bad_mask_name_is_named():
    with pytest.raises(KeyError, match="nope"):
        finetune(mlp(), loader(task(n=32)), epochs=1, masks={"nope": torch.ones(1)}, progress=False)


def test_milestones_change_lr_at_the_right_epoch():
    ds = task(n=64)
    res = finetune(mlp(), loader(ds), epochs=4, lr=0.1, gamma=0.1, milestones=[2], progress=False)
    assert res.lr == pytest.approx((0.1, 0.1, 0.01, 0.01))
    # Default milestones: [epochs // 2, 3 * epochs // 4] = [2, 3] for 4 epochs.
    res = finetune(mlp(), loader(ds), epochs=4, lr=0.1, gamma=0.5, progress=False)
    assert res.lr == pytest.approx((0.1, 0.1, 0.05, 0.025))


def test_max_batches_and_paper_defaults(tmp_path):
    ds = task(n=128)
    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        return nn.functional.cross_entropy(out, y)

    finetune(mlp(), loader(ds), epochs=2, loss_fn=loss_fn, max_batches=2, progress=True, checkpoint_dir=tmp_path)
    assert calls[0] == 4
    group = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 5e-4)


def test_default_milestones_for_two_epochs():
    res = finetune(mlp(), loader(task(n=32)), epochs=2, lr=1.0, progress=False)
    assert res.lr == pytest.approx((1.0, 0.01))


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(OSError, match=re.escape(str(tmp_path / CHECKPOINT_NAME))):
        finetune(mlp(), loader(task(n=32)), epochs=1, checkpoint_dir=tmp_path, progress=False)


def test_finetune_a_pruned_graph_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    gm = oba_fx.prune_graph(model.eval(), torch.randn(1, 3, 6, 6), criterion="l1", target_flops=0.5)
    x = torch.randn(64, 3, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0].mean((1, 2)) > 0).long()
    before = [p.detach().clone() for p in gm.parameters()]
    res = finetune(gm, DataLoader(TensorDataset(x, y), batch_size=16), epochs=1, lr=0.05, progress=False)
    assert res.epochs_run == (1,) and res.train_loss[0] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, gm.parameters()))
    assert gm.meta["oba"]["flops_after"] < gm.meta["oba"]["flops_before"]
