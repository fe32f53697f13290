"""``benchmarks/finetuned.py --resume`` adds rows to a result only under the same protocol (model, seed,
data, fine-tuning recipe)."""
import pytest

from _bench import load_benchmark


def test_resume_refuses_a_result_of_another_recipe():
    ft = load_benchmark("finetuned.py")
    old = {"model": "resnet56", "seed": 1, "calib": 512, "epochs": 1}  # written before --lr existed
    ft.check_same_protocol(old, dict(old, lr=1e-3, schedule="step"), "x.json")  # same recipe: fine
    with pytest.raises(SystemExit, match="x.json was run with other settings.*'schedule': \\('step', 'cosine'\\)"):
        ft.check_same_protocol(old, dict(old, lr=1e-3, schedule="cosine"), "x.json")
