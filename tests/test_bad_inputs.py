"""Every bad input of issue #13 item 5 gets one error of the oba_fx family: an ``OBAError`` that is
also the built-in it replaces, on one line, saying what was wrong and the way out."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import oba_fx
from oba_fx.cli import main
from oba_fx.finetune import finetune  # oba_fx.finetune is the module once any code imported it
from oba_fx.models import load_checkpoint
from oba_fx.errors import OBAError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(n: int = 2, labels: torch.Tensor | None = None) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g) if labels is None else labels)
            for _ in range(n)]


def _raises(builtin: type, fn, *words: str) -> str:
    """Run ``fn``; it must raise an OBAError that is also ``builtin``, one line holding ``words``."""
    with pytest.raises(builtin) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, OBAError), type(info.value).__mro__
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _prune(model=None, **kw):
    kw = {"channel_ratio": 0.5, "verbose": False, **kw}
    return lambda: oba_fx.prune_graph(_mlp() if model is None else model, torch.randn(1, 4), **kw)


# ---- labels -------------------------------------------------------------------------------------

def test_labels_of_the_wrong_shape_name_the_batch_and_the_expected_shape():
    data = _data(labels=torch.zeros(6, 2, dtype=torch.long))
    _raises(ValueError, _prune(criterion="taylor", data=data), "calibration batch 0", "shape (6, 2)", "expected (6,)",
            "loss_fn=")


def test_labels_out_of_range_name_the_label_and_the_number_of_outputs():
    labels = torch.tensor([0, 1, 2, 7, 0, 1])
    _raises(ValueError, lambda: oba_fx.score(_mlp(), _data(labels=labels), criterion="oba", progress=False),
            "label 7", "[0, 3)", "3 outputs", "number of classes")


def test_float_labels_say_how_to_convert_them():
    _raises(ValueError, _prune(criterion="taylor", data=_data(labels=torch.zeros(6))), "dtype torch.float32",
            "labels.long()")


def test_labels_out_of_range_are_found_in_a_later_training_batch():
    data = _data(3)
    data[2] = (data[2][0], torch.full((6,), -3))
    _raises(ValueError, lambda: finetune(_mlp(), data, epochs=1, progress=False), "batch 3", "label -3")


def test_labels_out_of_range_in_power_iteration_and_unstructured_pruning():
    data = _data(labels=torch.full((6,), 3))
    _raises(ValueError, lambda: oba_fx.power_iteration(_mlp(), data, iters=2, progress=False), "label 3")
    _raises(ValueError, lambda: oba_fx.prune_unstructured(_mlp(), data, criterion="taylor", sparsity=0.5,
                                                          progress=False), "label 3")


def test_a_custom_loss_takes_any_targets():
    def loss(z, y):  # regression on 3 outputs
        return ((z - y) ** 2).mean()

    data = [(x, torch.randn(6, 3)) for x, _ in _data()]
    scores = oba_fx.score(_mlp(), data, criterion="taylor", loss_fn=loss, progress=False)
    assert scores["0.weight"].shape == (8, 4)


def test_calibration_inputs_that_do_not_fit_the_model_name_the_batch():
    data = [(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))]
    _raises(ValueError, _prune(criterion="taylor", data=data), "calibration batch 0", "(6, 5)", "do not fit")


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["prune_graph", "score", "finetune", "prune_unstructured"])
def test_a_bare_tensor_as_data_asks_for_batches(entry):
    x = torch.randn(6, 4)
    call = {
        "prune_graph": _prune(criterion="taylor", data=x),
        "score": lambda: oba_fx.score(_mlp(), x, criterion="taylor", progress=False),
        "finetune": lambda: finetune(_mlp(), x, epochs=1, progress=False),
        "prune_unstructured": lambda: oba_fx.prune_unstructured(_mlp(), x, criterion="taylor", sparsity=0.5),
    }[entry]
    _raises(TypeError, call, entry, "bare tensor of shape (6, 4)", "(inputs, targets)", "DataLoader")


def test_batches_without_labels_for_a_criterion_that_needs_them():
    _raises(TypeError, _prune(criterion="taylor", data=[torch.randn(6, 4)]), "calibration batch 0",
            "not an (inputs, targets) pair")


def test_a_generator_with_several_steps_is_read_once_and_prunes_like_a_list():
    data = _data(3)
    from_list = _prune(criterion="taylor", data=data, steps=3)()
    from_gen = _prune(criterion="taylor", data=(b for b in data), steps=3)()
    assert from_gen.meta["oba"]["kept"] == from_list.meta["oba"]["kept"]
    x = torch.randn(5, 4)
    assert torch.equal(from_gen(x), from_list(x))


def test_a_generator_read_for_several_epochs_fails_up_front():
    _raises(ValueError, lambda: finetune(_mlp(), (b for b in _data()), epochs=2, progress=False),
            "one-shot iterator", "read 2 times", "DataLoader")


# ---- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["prune_graph", "prune_unstructured", "score"])
def test_a_meta_device_model_asks_to_materialise_it(entry):
    model = _mlp().to("meta")
    call = {"prune_graph": _prune(model),
            "prune_unstructured": lambda: oba_fx.prune_unstructured(model, None, criterion="l1", sparsity=0.5),
            "score": lambda: oba_fx.score(model, None, criterion="l1")}[entry]
    _raises(ValueError, call, entry, "'0.weight'", "meta device", "to_empty")


@pytest.mark.parametrize("entry", ["prune_graph", "explain", "score", "finetune", "prune_unstructured"])
def test_a_non_module_is_refused_naming_the_entry_point(entry):
    f = torch.sin
    call = {"prune_graph": _prune(f),
            "explain": lambda: oba_fx.explain(f, torch.randn(1, 4)),
            "score": lambda: oba_fx.score(f, None, criterion="l1"),
            "finetune": lambda: finetune(f, _data(), epochs=1),
            "prune_unstructured": lambda: oba_fx.prune_unstructured(f, None, criterion="l1", sparsity=0.5)}[entry]
    _raises(TypeError, call, f"{entry} expects a torch.nn.Module", "builtin_function_or_method", "nn.Module instance")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("entry", ["prune_graph", "explain", "hessian_structure"])
def test_a_torchscript_module_asks_for_the_eager_module(entry):
    scripted = torch.jit.script(_mlp())
    call = {"prune_graph": _prune(scripted),
            "explain": lambda: oba_fx.explain(scripted, torch.randn(1, 4)),
            "hessian_structure": lambda: oba_fx.hessian_structure(scripted, torch.randn(1, 4))}[entry]
    _raises(TypeError, call, "TorchScript", "torch.fx cannot trace", "before torch.jit.script")


def test_example_inputs_of_the_wrong_shape_print_no_internal_traceback(capfd):
    _raises(ValueError, lambda: oba_fx.prune_graph(_mlp(), torch.randn(1, 5), channel_ratio=0.5), "(1, 5)",
            "do not fit the model")
    assert "Traceback" not in capfd.readouterr().err


# ---- save / load --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gm():
    return oba_fx.prune_graph(_mlp(), torch.randn(1, 4), channel_ratio=0.5, verbose=False)


def test_save_into_a_missing_folder_names_the_path_not_a_temporary_file(gm, tmp_path):
    path = tmp_path / "no" / "m.pt"
    msg = _raises(FileNotFoundError, lambda: oba_fx.save(gm, path), str(path), "does not exist", "create it")
    assert ".tmp" not in msg


def test_save_under_a_file_names_it(gm, tmp_path):
    (tmp_path / "f").write_text("x")
    _raises(OSError, lambda: oba_fx.save(gm, tmp_path / "f" / "m.pt"), "is a file",
            "writable folder")


def test_save_into_an_unwritable_folder_fails_before_any_work(gm, tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path) else real(p, mode))
    monkeypatch.setattr(torch, "save", lambda *a, **k: pytest.fail("save pickled before checking the folder"))
    _raises(OSError, lambda: oba_fx.save(gm, tmp_path / "m.pt"), str(tmp_path / "m.pt"), "not writable")


def test_a_failed_write_names_the_path_and_leaves_no_temporary_file(gm, tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    msg = _raises(OSError, lambda: oba_fx.save(gm, tmp_path / "m.pt"), str(tmp_path / "m.pt"), "No space left")
    assert ".tmp" not in msg and list(tmp_path.iterdir()) == []


def test_save_of_a_plain_module_says_what_to_do(tmp_path):
    _raises(TypeError, lambda: oba_fx.save(_mlp(), tmp_path / "m.pt"), "torch.fx.GraphModule", "state_dict()")


@pytest.mark.parametrize("seed", range(12))
def test_load_of_a_random_file_names_it(tmp_path, seed):
    path = tmp_path / "r.pt"
    path.write_bytes(random.Random(seed).randbytes(512))  # unpickling random bytes fails in many ways
    _raises(OSError, lambda: oba_fx.load(path), str(path), "cannot read", "oba_fx.io.save")


def test_load_of_a_folder_is_refused(tmp_path):
    _raises(OSError, lambda: oba_fx.load(tmp_path), "is a folder", "oba_fx.save")


# ---- the command line ---------------------------------------------------------------------------

def _cli(capsys, *argv: str) -> str:
    """Run the CLI in-process: it must exit 2 with exactly one error line and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("oba-fx: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def test_cli_checks_out_before_loading_anything(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    line = _cli(capsys, "prune", "--out", str(tmp_path / "f" / "m.pt"), "--data", str(tmp_path / "no_data"))
    assert "--out" in line and "is a file" in line and "writable folder" in line


def test_cli_calib_batches_zero(capsys, tmp_path):
    line = _cli(capsys, "prune", "--calib-batches", "0", "--data", str(tmp_path / "no_data"))
    assert "--calib-batches must be a positive integer, got 0" in line


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--test-limit", "--train-limit"])
def test_cli_numeric_flags_are_checked_before_the_data(capsys, tmp_path, flag):
    line = _cli(capsys, "prune", flag, "0", "--data", str(tmp_path / "no_data"))
    assert f"{flag} must be a positive integer" in line


def test_cli_unknown_criterion_lists_the_known_ones(capsys, tmp_path):
    line = _cli(capsys, "prune", "--criterion", "gradnorm", "--data", str(tmp_path / "no_data"))
    assert "unknown criterion 'gradnorm'" in line and "oba" in line and "register_criterion" in line


def test_cli_random_weights_file_is_named_without_torch_advice(capsys, tmp_path):
    weights = tmp_path / "w.th"
    weights.write_bytes(random.Random(0).randbytes(512))
    line = _cli(capsys, "prune", "--weights", str(weights), "--data", str(tmp_path / "no_data"))
    assert str(weights) in line and "not a torch checkpoint" in line and "torch.save" in line
    assert "weights_only" not in line


def test_weights_holding_python_objects_are_explained(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"optimizer": torch.optim.SGD}, path)
    _raises(OSError, lambda: load_checkpoint(_mlp(), path), str(path), "Python objects",
            "model.state_dict()")


def test_weights_of_another_architecture_are_summarised(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(4, 8).state_dict(), path)
    _raises(ValueError, lambda: load_checkpoint(_mlp(), path), "does not fit Sequential",
            "missing keys", "unexpected keys")


def test_cli_eval_of_a_missing_model_file_is_not_an_unknown_name(capsys, tmp_path):
    line = _cli(capsys, "eval", "--model", "missing.pt", "--data", str(tmp_path))
    assert "'missing.pt': no such file" in line and "oba-fx prune --out" in line
    assert "unknown model name" not in line


def test_cli_explain_checks_its_weights(capsys, tmp_path):
    line = _cli(capsys, "explain", "--weights", str(tmp_path / "none.th"), "--out", str(tmp_path))
    assert "does not exist" in line and "none.th" in line


def test_cli_flags_are_checked_before_torch_is_imported():
    code = ("import sys, oba_fx.cli; rc = oba_fx.cli.main(['prune', '--calib-batches', '0']); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["2", "False"] and "--calib-batches" in r.stderr


def test_a_meta_buffer_is_named_after_every_parameter_is_checked():
    from oba_fx.checks import check_model

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))
    model[0].running_mean = torch.zeros(2, device="meta")
    _raises(ValueError, lambda: check_model(model, "prune_graph"), "buffer '0.running_mean'", "meta device")
    model[1].bias = torch.nn.Parameter(torch.zeros(2, device="meta"))
    _raises(ValueError, lambda: check_model(model, "prune_graph"), "parameter '1.bias'", "meta device")
