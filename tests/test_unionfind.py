"""The union-find labels (components against networkx, compact_min against the sorting compact) and
the Builder's units and groups against their definition."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from oba_fx.spaces import Builder
from oba_fx.unionfind import compact, compact_min, components


def _random_edges(seed: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, m), rng.integers(0, n, m)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,m", [(200, 150), (2000, 60)], ids=["dense", "few-edges"])
def test_components_label_each_element_with_its_components_smallest_member(seed, n, m):
    a, b = _random_edges(seed, n, m)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(a.tolist(), b.tolist()))
    expected = np.empty(n, np.int64)
    for comp in nx.connected_components(g):
        expected[list(comp)] = min(comp)
    assert components(n, a, b).tolist() == expected.tolist()


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


def _reference(spaces, edges, n):
    """Units and groups straight from the definition (networkx), numbered by smallest member."""
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    unit = np.empty(n, np.int64)
    for k, comp in enumerate(sorted(nx.connected_components(g), key=min)):
        unit[list(comp)] = k
    h = nx.Graph()
    h.add_nodes_from(range(int(unit.max()) + 1))
    for s in spaces:  # the units of one space belong to one group
        us = unit[s.base : s.base + s.size].tolist()
        h.add_edges_from(zip(us, us[1:]))
    group = np.empty(h.number_of_nodes(), np.int64)
    for k, comp in enumerate(sorted(nx.connected_components(h), key=min)):
        group[list(comp)] = k
    return unit, group


@pytest.mark.parametrize("seed", range(8))
def test_builder_units_and_groups_match_their_definition(seed):
    rng = np.random.default_rng(seed)
    b = Builder()
    spaces = [b.param_space(f"p{i}", 0, int(rng.integers(1, 5)), primary=True) for i in range(30)]
    edges = []
    for _ in range(25):
        x, y = (spaces[i] for i in rng.integers(0, len(spaces), 2))
        kind = rng.integers(0, 3)
        if kind == 0 and x.size == y.size:  # identity
            b.union(x, y)
            edges += zip(x.elements().tolist(), y.elements().tolist())
        elif kind == 1:  # index by index
            k = int(min(x.size, y.size))
            ia, ib = rng.permutation(x.size)[:k], rng.permutation(y.size)[:k]
            b.union(x, y, ia, ib)
            edges += zip(x.elements(ia).tolist(), y.elements(ib).tolist())
        else:  # several elements at once
            e = np.concatenate([x.elements(), y.elements()])[: int(rng.integers(1, 6))]
            b.union_many(e)
            edges += zip(e[:-1].tolist(), e[1:].tolist())
    c = b.build()
    unit, group = _reference(spaces, edges, sum(s.size for s in spaces))
    assert c.unit.tolist() == unit.tolist() and c.group.tolist() == group.tolist()
