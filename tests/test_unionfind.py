"""The union-find labels: components against networkx, compact_min against the sorting compact."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from oba_fx.unionfind import compact, compact_min, components


def _random_edges(seed: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, m), rng.integers(0, n, m)


@pytest.mark.parametrize("seed", range(5))
def test_components_label_each_element_with_its_components_smallest_member(seed):
    a, b = _random_edges(seed, 200, 150)
    g = nx.Graph()
    g.add_nodes_from(range(200))
    g.add_edges_from(zip(a.tolist(), b.tolist()))
    expected = np.empty(200, np.int64)
    for comp in nx.connected_components(g):
        expected[list(comp)] = min(comp)
    assert components(200, a, b).tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_compact_min_equals_compact_on_components_and_their_prefixes(seed):
    a, b = _random_edges(seed, 300, 200)
    labels = components(300, a, b)
    for k in (300, 157, 1):
        fast, n_fast = compact_min(labels[:k])
        slow, n_slow = compact(labels[:k])
        assert n_fast == n_slow and fast.tolist() == slow.tolist()


def test_compact_min_of_nothing_is_empty():
    labels, n = compact_min(np.zeros(0, np.int64))
    assert labels.size == 0 and n == 0
