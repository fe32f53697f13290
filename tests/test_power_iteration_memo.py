"""``benchmarks/finetuned.py`` shares power iteration between rows: the shared result must be the
one a fresh call gives, and any different input (weights, masks, batches, options) recomputes."""
import pytest
import torch
from torch import nn

from _bench import load_benchmark
from _oracle import one_thread  # noqa: F401
from oba_fx.hessian_eigen import power_iteration


@pytest.fixture
def memo_cls():
    return load_benchmark("finetuned.py").PowerIterationMemo


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))]


def test_shared_result_equals_a_fresh_call(memo_cls):
    m, data = _net(), _data()
    memo = memo_cls(power_iteration)
    first = memo(m, data, k=1, iters=20, tol=1e-6, progress=False)
    again = memo(_net(), _data(), k=1, iters=20, tol=1e-6, progress=False)
    fresh = power_iteration(m, data, k=1, iters=20, tol=1e-6, progress=False)
    assert memo.hits == 1 and again is first
    assert first.eigenvalues == fresh.eigenvalues
    assert all(torch.equal(first.eigenvectors[0][n], fresh.eigenvectors[0][n]) for n in fresh.param_names)


def test_different_weights_masks_batches_or_options_recompute(memo_cls):
    m, data = _net(), _data()
    memo = memo_cls(power_iteration)
    memo(m, data, k=1, iters=5, progress=False)
    other = _net()
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3
    mask = {"0.weight": torch.ones_like(m[0].weight, dtype=torch.bool)}
    mask["0.weight"][0, 0, 0, 0] = False
    for model, batches, kw in [(other, data, {}), (m, _data(2), {}), (m, data, {"seed": 3}),
                               (m, data, {"masks": mask})]:
        memo(model, batches, k=1, iters=5, progress=False, **kw)
    assert memo.hits == 0 and len(memo.cache) == 5
