"""``benchmarks/seed_spread.py``: mean and spread over seeds, and "beats" only beyond the spread."""
import pytest

from _bench import load_benchmark


@pytest.fixture(scope="module")
def ss():
    return load_benchmark("seed_spread.py")


def _row(spec, level, one, tuned, kind="structured"):
    return {"kind": kind, "spec": spec, "level": level, "oneshot": {"exact1k": one, "jpeg": one - 0.1},
            "tuned": {"exact1k": tuned, "jpeg": tuned - 0.1}}


def _result(seed, rows, model="resnet56"):
    return {"settings": {"model": model, "seed": seed}, "rows": rows}


def _three_seeds():
    # oba: tuned 0.91/0.92/0.93 against l1 0.88/0.89/0.90 (means 3 points apart, half-spreads 1 + 1:
    # beats); one-shot 0.80/0.86/0.84 against l1 0.82/0.83/0.85 (within spread)
    return [_result(s, [_row("l1", 0.5, l1o, l1t), _row("oba", 0.5, o, t)])
            for s, (l1o, l1t, o, t) in enumerate([(0.82, 0.88, 0.80, 0.91), (0.83, 0.89, 0.86, 0.92),
                                                  (0.85, 0.90, 0.84, 0.93)])]


def test_verdict_needs_the_means_apart_by_more_than_the_half_spreads(ss):
    # means 0.93 vs 0.9025, half-spreads 0.02 + 0.0025: apart by 0.0275 > 0.0225
    assert ss.verdict([0.91, 0.95], [0.90, 0.905]) == "beats"
    # means 0.93 vs 0.91, half-spreads 0.02 + 0.01: 0.02 < 0.03
    assert ss.verdict([0.91, 0.95], [0.90, 0.92]) == "within spread"
    assert ss.verdict([0.80, 0.85], [0.86, 0.90]) == "loses"


def test_summary_gives_mean_min_max_per_cell(ss):
    rows = {(r["spec"], r["level"]): r for r in ss.summarise(_three_seeds())["rows"]}
    oba = rows[("oba", 0.5)]
    assert oba["seeds"] == [0, 1, 2]
    assert oba["tuned_exact1k"]["mean"] == pytest.approx(0.92, abs=1e-12)
    assert (oba["tuned_exact1k"]["min"], oba["tuned_exact1k"]["max"]) == (0.91, 0.93)
    assert oba["oneshot_jpeg"]["mean"] == pytest.approx(0.7333333333, abs=1e-9)


def test_summary_verdict_and_paired_difference_against_baseline(ss):
    oba = {r["spec"]: r for r in ss.summarise(_three_seeds())["rows"]}["oba"]
    assert oba["vs_l1_tuned_exact1k"]["verdict"] == "beats"
    assert oba["vs_l1_oneshot_exact1k"]["verdict"] == "within spread"
    diff = oba["vs_l1_oneshot_exact1k"]["paired_diff"]
    assert (diff["min"], diff["max"]) == pytest.approx((-0.02, 0.03), abs=1e-12)


def test_no_verdict_from_a_single_shared_seed(ss):
    res = [_result(0, [_row("l1", 0.5, 0.8, 0.9), _row("oba", 0.5, 0.9, 0.95)]),
           _result(1, [_row("l1", 0.5, 0.8, 0.9)])]
    oba = {r["spec"]: r for r in ss.summarise(res)["rows"]}["oba"]
    assert "vs_l1_tuned_exact1k" not in oba


def test_same_row_twice_for_one_seed_is_an_error(ss):
    with pytest.raises(ValueError, match="appears twice for seed 0"):
        ss.summarise([_result(0, [_row("l1", 0.5, 0.8, 0.9)]), _result(0, [_row("l1", 0.5, 0.8, 0.9)])])


def test_mixed_models_are_an_error(ss):
    with pytest.raises(ValueError, match="mix models"):
        ss.summarise([_result(0, [], "resnet20"), _result(1, [], "resnet56")])


def test_markdown_marks_single_seed_cells(ss):
    res = [_result(0, [_row("l1", 0.5, 0.8, 0.9), _row("taylor", 0.7, 0.85, 0.9)]),
           _result(1, [_row("l1", 0.5, 0.82, 0.91)])]
    md = ss.markdown(ss.summarise(res))
    assert "| structured | taylor | 0.7 | 1 | 85.0 (1 seed) |" in md
    assert "| structured | l1 | 0.5 | 2 | 81.0 (80.0–82.0) |" in md


def test_min_seeds_leaves_out_cells_with_fewer_seeds(ss):
    res = [_result(0, [_row("l1", 0.5, 0.8, 0.9), _row("taylor", 0.7, 0.85, 0.9)]),
           _result(1, [_row("l1", 0.5, 0.82, 0.91)])]
    assert [r["spec"] for r in ss.summarise(res, min_seeds=2)["rows"]] == ["l1"]


def test_results_of_another_recipe_are_an_error(ss):
    other = _result(1, [_row("l1", 0.5, 0.8, 0.9)])
    other["settings"].update(lr=0.01, schedule="cosine")
    with pytest.raises(ValueError, match="differ in more than the seed.*'lr': \\(0.001, 0.01\\)"):
        ss.summarise([_result(0, [_row("l1", 0.5, 0.8, 0.9)]), other])


def test_markdown_names_a_recipe_other_than_the_cli_one(ss):
    runs = [_result(s, [_row("l1", 0.5, 0.8, 0.9)]) for s in (0, 1)]
    assert "SGD lr" not in ss.markdown(ss.summarise(runs)).splitlines()[0]
    for r in runs:
        r["settings"].update(lr=0.003, schedule="cosine")
    assert ss.markdown(ss.summarise(runs)).splitlines()[0].endswith(
        "(SGD lr 0.003, decayed to 0 by a per-step cosine)")
