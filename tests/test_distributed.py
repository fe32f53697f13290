"""Data parallelism on torch.distributed (gloo, CPU): two processes that each see half of the
calibration batches take the same decisions as one process that sees them all, and find the same
Hessian eigenpairs (power iteration, ``"camp"`` scores)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import oba_fx
import oba_fx.distributed
from oba_fx.evaluate import evaluate

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(4)]


def _run(data):
    """Scores, a compensated pruning and a BN recalibration: everything that reads data."""
    model, x = _model(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    scores = oba_fx.score(model, data, criterion="oba", progress=False)
    comp = oba_fx.prune_graph(model, x[:1], criterion="taylor", data=data, channel_ratio=0.4, verbose=False,
                              compensate={"positions": 16})  # sampled positions: seeded per batch
    recal = oba_fx.prune_graph(model, x[:1], criterion="l1", data=data, channel_ratio=0.4, verbose=False,
                               compensate=False)
    return {"scores": {k: v.detach() for k, v in scores.items()}, "kept": comp.meta["oba"]["kept"],
            "comp_out": comp(x).detach(), "comp_w": comp.get_submodule("3").weight.detach().clone(),
            "bn": recal.get_submodule("1").running_var.detach().clone(), "recal_out": recal(x).detach(),
            "accuracy": evaluate(comp, data + data[:1])}  # 5 batches: 3 on rank 0, 2 on rank 1


def _eigen(data):
    """Power iteration (2 pairs) and the ``"camp"`` criterion on a small float64 network."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64), y % 3)
            for i, (_, y) in enumerate(data)] + [(torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2]))]
    r = oba_fx.power_iteration(model, data, k=2, iters=300, tol=1e-6, progress=False)
    camp = oba_fx.score(model, data, criterion="camp", progress=False)
    return {"eigenvalues": r.eigenvalues, "eigenvectors": r.eigenvectors, "n_batches": r.n_batches,
            "camp": {k: v.detach() for k, v in camp.items()}}


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _run(_data())
        out["eigen"] = _eigen(_data())
        out["world"] = oba_fx.distributed.world()
        out["my_batches"] = len(list(oba_fx.distributed.shard(_data())))
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-30)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 gloo processes computed (one launch for the tests of this file)."""
    path = str(tmp_path_factory.mktemp("ranks") / "rank")
    mp.start_processes(_worker, args=(2, _free_port(), path), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{path}.{r}", weights_only=False) for r in (0, 1)]


def test_two_processes_decide_what_one_process_decides(two_ranks):
    single = _run(_data())
    for got in two_ranks:
        assert got["world"] == 2 and got["my_batches"] == 2   # each rank read half of the batches
        assert got["kept"] == single["kept"]
        assert all(_close(got["scores"][k], single["scores"][k]) for k in single["scores"])
        assert _close(got["comp_w"], single["comp_w"]) and _close(got["comp_out"], single["comp_out"])
        assert _close(got["bn"], single["bn"]) and _close(got["recal_out"], single["recal_out"])
        assert got["accuracy"] == single["accuracy"]


def test_two_processes_find_the_eigenpairs_one_process_finds(two_ranks):
    single = _eigen(_data())
    for got in (r["eigen"] for r in two_ranks):
        assert got["n_batches"] == single["n_batches"] == 5   # counted over both ranks (3 + 2 batches)
        assert all(abs(a - b) <= 1e-8 * abs(b) for a, b in zip(got["eigenvalues"], single["eigenvalues"]))
        for vg, vs in zip(got["eigenvectors"], single["eigenvectors"]):
            assert all(_close(vg[k], vs[k], 1e-6) for k in vs)
        assert all(_close(got["camp"][k], single["camp"][k], 1e-6) for k in single["camp"])
