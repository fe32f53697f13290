"""``oba_fx.io.save`` / ``load``: a slimmed GraphModule round-trips with its report, and loading
needs neither the pruned model's class nor its original weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx
import torch.nn as nn

import oba_fx
from _oracle import one_thread  # noqa: F401 (autouse fixture: one torch thread on the shared cores)
from oba_fx.io import FORMAT, load, save


def pruned_local_model() -> torch.fx.GraphModule:
    class LocalNet(nn.Module):  # defined here: cannot be imported when loading
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.bn(self.c1(x)))
            y = torch.relu(self.c2(y)) + y
            return self.fc(torch.flatten(y.mean((2, 3)), 1))

    torch.manual_seed(0)
    model = LocalNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return oba_fx.prune_graph(model, torch.randn(2, 3, 8, 8), criterion="l1", target_flops=0.5)


@pytest.fixture(scope="module")
def gm() -> torch.fx.GraphModule:
    return pruned_local_model()


def test_round_trip_outputs_and_report(gm, tmp_path):
    path = save(gm, tmp_path / "small.pt")
    back = load(path)
    assert isinstance(back, torch.fx.GraphModule)
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(back(x), gm(x))
    assert back.meta["oba"] == gm.meta["oba"]
    assert back.meta["oba"]["flops_after"] < back.meta["oba"]["flops_before"]
    assert back.training == gm.training is False
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in gm.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), gm.state_dict().values()))
    assert back.code == gm.code
    assert os.listdir(tmp_path) == ["small.pt"]  # the temporary file was renamed
    # The file refers to no oba_fx class (torch.fx's default tracer, not oba_fx's).
    assert torch.load(path, weights_only=False)["format"] == FORMAT


def test_load_in_a_fresh_interpreter(gm, tmp_path):
    """A new process has neither the test's class nor its weights: the file suffices."""
    path = save(gm, tmp_path / "small.pt")
    x = torch.randn(2, 3, 8, 8)
    torch.save({"x": x, "y": gm(x).detach()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import torch
        from oba_fx.io import load
        gm = load({str(path)!r})
        d = torch.load({str(tmp_path / "io.pt")!r})
        assert torch.equal(gm(d["x"]), d["y"])
        print(gm.meta["oba"]["flops_after"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == gm.meta["oba"]["flops_after"]


def test_save_does_not_modify_the_module(gm, tmp_path):
    tracer_cls = gm.graph._tracer_cls
    meta = dict(gm.meta)
    save(gm, tmp_path / "a.pt")
    assert gm.graph._tracer_cls is tracer_cls and gm.meta == meta


def test_plain_torch_save_file_loads_without_report(gm, tmp_path):
    torch.save(gm, tmp_path / "plain.pt")
    back = load(tmp_path / "plain.pt")
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(back(x), gm(x)) and back.meta == {}


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load(path)


def test_corrupt_file_names_the_path(gm, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(OSError, match=re.escape(str(path))):
        load(path)
    good = save(gm, tmp_path / "good.pt")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(OSError, match=re.escape(str(good))):
        load(good)


def test_other_content_is_rejected(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a module saved by oba_fx.io.save"):
        load(path)


def test_locally_defined_leaf_class_is_refused_at_save(tmp_path):
    class LocalLeaf(nn.Module):
        def forward(self, x):
            return x * 2

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, LocalLeaf) or super().is_leaf_module(m, qualname)

    root = nn.Sequential(nn.Linear(2, 2), LocalLeaf())
    gm = torch.fx.GraphModule(root, Tracer().trace(root))
    with pytest.raises(ValueError, match="LocalLeaf"):
        save(gm, tmp_path / "x.pt")
    assert not os.listdir(tmp_path)


def test_save_needs_a_graph_module(tmp_path):
    with pytest.raises(TypeError, match="GraphModule"):
        save(nn.Linear(2, 2), tmp_path / "x.pt")
