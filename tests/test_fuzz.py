"""A seeded slice of ``benchmarks/fuzz.py``: 20 random networks, none may crash, be wrong or
end in ``SurgeryError`` (an internal bug); the rest of the outcomes are reported, not judged."""

import time

import torch

from _bench import load_benchmark
from _oracle import one_thread  # noqa: F401

fuzz = load_benchmark("fuzz.py")


def test_fuzz_slice_has_no_crash_no_wrong_network_and_no_surgery_error():
    t0 = time.perf_counter()
    records = [fuzz.run_one(seed) for seed in range(20)]
    bad = [(r["seed"], r["recipe"], r["outcome"], r["detail"]) for r in records
           if r["outcome"] == "wrong" or r["outcome"].startswith("crashed") or r["outcome"].endswith("SurgeryError")]
    assert not bad, bad
    assert sum(r["outcome"] == "pruned" for r in records) >= 10, fuzz.summarise(records)
    assert time.perf_counter() - t0 < 60


def test_fuzz_networks_are_reproducible_and_run():
    m1, x1, r1 = fuzz.build(7)
    m2, x2, r2 = fuzz.build(7)
    assert r1 == r2 and torch.equal(x1, x2)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(m1(x1)),
                                                      torch.utils._pytree.tree_leaves(m2(x2))))


def test_summary_table_counts_every_outcome():
    recs = [{"seed": 0, "outcome": "pruned", "detail": "", "barriers": ["x"]},
            {"seed": 1, "outcome": "crashed: TypeError", "detail": "boom"},
            {"seed": 2, "outcome": "wrong", "detail": "relative error 1"}]
    table = fuzz.summarise(recs)
    assert "| pruned | 1 |" in table and "| crashed: TypeError | 1 |" in table and "| wrong | 1 |" in table
    assert "| 1 | crashed: TypeError | boom |" in table
