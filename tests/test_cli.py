"""The oba-fx command: clear messages and a non-zero exit on bad input."""

import pytest

from oba_fx.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_model_names_close_matches(capsys, data_dir):
    code, err = _run(capsys, "prune", "--model", "resnet57", "--data", str(data_dir))
    assert code != 0 and "resnet57" in err and "resnet56" in err


def test_missing_weights_file_is_named(capsys, data_dir, tmp_path):
    missing = tmp_path / "nope.th"
    code, err = _run(capsys, "prune", "--weights", str(missing), "--data", str(data_dir))
    assert code != 0 and str(missing) in err


def test_bad_target_is_explained(capsys, data_dir):
    code, err = _run(capsys, "prune", "--model", "resnet20", "--target-flops", "1.5", "--data", str(data_dir),
                     "--test-limit", "10", "--quiet")
    assert code != 0 and "(0, 1]" in err


def test_unreadable_data_folder_is_named(capsys, tmp_path):
    code, err = _run(capsys, "prune", "--data", str(tmp_path / "missing"))
    assert code != 0 and "missing" in err


def test_no_data_setting_says_how_to_give_one(capsys, monkeypatch):
    monkeypatch.delenv("OBA_FX_DATA", raising=False)
    code, err = _run(capsys, "prune")
    assert code != 0 and "OBA_FX_DATA" in err and "--data" in err


def test_explain_writes_both_graphs(capsys, tmp_path):
    assert main(["explain", "--model", "resnet20", "--format", "dot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "coupling.dot").read_text().startswith("graph") and (tmp_path / "hessian.dot").exists()


def test_usage_error_exits_non_zero():
    with pytest.raises(SystemExit) as e:
        main(["prune", "--target-flops", "half"])
    assert e.value.code != 0


def test_torchvision_dataset_missing_says_so_without_downloading(capsys, tmp_path):
    code, err = _run(capsys, "prune", "--model", "resnet20", "--dataset", "cifar10", "--data", str(tmp_path))
    assert code != 0 and "download" in err.lower()
