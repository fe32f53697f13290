"""CIFAR models, registry and data loading: one claim per test."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from oba_fx.data import cifar10_loader, load_cifar10_npz
from oba_fx.evaluate import evaluate
from oba_fx.data import data_dir as resolve_data_dir  # the name data_dir is the conftest fixture
from oba_fx.models import get_model, list_models, load_checkpoint

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wide_resnet32", "vgg19_bn_cifar"]

WEIGHTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        ("wide_resnet32", 7_427_914),
        ("vgg19_bn_cifar", 20_035_018),
    ],
)
def test_param_count(name, expected):
    assert n_params(get_model(name)) == expected


def test_num_classes_sets_classifier_outputs():
    assert get_model("resnet20", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_symbolic_trace_matches_eager(name):
    torch.manual_seed(0)
    model = get_model(name).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_option_a_shortcut_is_pad_in_graph():
    gm = torch.fx.symbolic_trace(get_model("resnet20"))
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert len(pads) == 2


def test_torchvision_name_is_accepted():
    assert get_model("resnet18", num_classes=7).fc.out_features == 7


def test_list_models_has_cifar_and_torchvision_names():
    names = list_models()
    assert set(CIFAR_NAMES) <= set(names) and "resnet50" in names


@pytest.mark.parametrize("name, min_acc", [("resnet20", 0.88), ("resnet56", 0.88)])
def test_pretrained_accuracy_on_lossless_test_images(data_dir, name, min_acc):
    model = get_model(name, weights=str(data_dir / "weights" / WEIGHTS[name]))
    loader = cifar10_loader(data_dir, "test_lossless1k", batch_size=250, limit=500)
    assert evaluate(model, loader) >= min_acc


def test_plain_state_dict_checkpoint_loads(tmp_path):
    src = get_model("resnet20")
    path = tmp_path / "plain.pt"
    torch.save(src.state_dict(), path)
    dst = load_checkpoint(get_model("resnet20"), path)
    assert torch.equal(dst.linear.weight, src.linear.weight)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"resnet20.*list_models\(\)"):
        get_model("resnet21")


def test_missing_checkpoint_names_path(tmp_path):
    missing = tmp_path / "nope.th"
    with pytest.raises(FileNotFoundError, match="nope.th"):
        get_model("resnet20", weights=str(missing))


def test_data_dir_unset_says_how_to_configure(monkeypatch):
    monkeypatch.delenv("OBA_FX_DATA", raising=False)
    with pytest.raises(RuntimeError, match=r"--data DIR.*OBA_FX_DATA"):
        resolve_data_dir()


def test_data_dir_env_var_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("OBA_FX_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_missing_npz_file_names_path_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10_test\.npz.*cifar10_train\.npz"):
        load_cifar10_npz(tmp_path, "test")


def test_unreadable_npz_file_names_path(tmp_path):
    (tmp_path / "cifar10_test.npz").write_bytes(b"not an archive")
    with pytest.raises(OSError, match="cifar10_test.npz"):
        load_cifar10_npz(tmp_path, "test")


def test_loaded_images_are_normalised_nchw(data_dir):
    x, y = load_cifar10_npz(data_dir, "test_lossless1k", limit=1000)
    assert x.shape == (1000, 3, 32, 32) and y.dtype == torch.int64
    assert x.mean().abs() < 0.2 and 0.9 < x.std() < 1.2
