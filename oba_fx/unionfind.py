"""Vectorised union-find over integer element ids (numpy), for graphs of ~10^6 elements.

Example:
    >>> import numpy as np
    >>> components(5, np.array([0, 3]), np.array([1, 4])).tolist()
    [0, 0, 2, 3, 3]
"""

from __future__ import annotations

import numpy as np


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label each of ``n`` elements with the smallest element id of its connected component.

    When few elements have an edge, only those are worked on (renumbered in increasing order,
    so that the smallest of them is still the smallest id); every other element is its own
    component.

    Args:
        n: number of elements (ids ``0..n-1``).
        a, b: equal-length integer arrays; each pair ``(a[k], b[k])`` is an undirected edge.

    Returns:
        ``int64`` array of length ``n``: the minimum id in each element's component.
    """
    labels = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if a.size == 0:
        return labels
    if 2 * a.size >= n:  # most elements have an edge
        return _smallest_labels(n, a, b)
    hit = np.zeros(n, dtype=bool)
    hit[a] = True
    hit[b] = True
    touched = np.flatnonzero(hit)
    local = np.empty(n, dtype=np.int64)
    local[touched] = np.arange(touched.size, dtype=np.int64)  # a touched element's rank among them
    labels[touched] = touched[_smallest_labels(touched.size, local[a], local[b])]
    return labels


def _smallest_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`components` of ``n`` elements, by hooking roots and pointer jumping."""
    labels = np.arange(n, dtype=np.int64)
    while True:
        la, lb = labels[a], labels[b]
        if np.array_equal(la, lb):
            return labels
        m = np.minimum(la, lb)
        np.minimum.at(labels, la, m)  # hook both roots onto the smaller label
        np.minimum.at(labels, lb, m)
        while True:  # pointer jumping until every element points at a root
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt


def compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber labels to ``0..k-1`` in order of first appearance of their smallest member.

    Example:
        >>> compact(np.array([0, 0, 2, 3, 3]))[0].tolist()
        [0, 0, 1, 2, 2]
    """
    uniq, inv = np.unique(labels, return_inverse=True)
    return inv.astype(np.int64), int(uniq.size)


def compact_min(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`compact` of labels that are each element's smallest component member (what
    :func:`components` returns, or a prefix of it): the same result, without sorting.

    Example:
        >>> compact_min(np.array([0, 0, 2, 3, 3]))[0].tolist()
        [0, 0, 1, 2, 2]
    """
    labels = np.asarray(labels, dtype=np.int64)
    roots = np.flatnonzero(labels == np.arange(labels.size))
    rank = np.empty(labels.size, dtype=np.int64)
    rank[roots] = np.arange(roots.size, dtype=np.int64)  # a root's rank among the roots
    return rank[labels], int(roots.size)
