"""Exact context preservation, for datasets whose generative factors are known (SynthArt)."""
from __future__ import annotations

import numpy as np


def context_at_k(query_factors: np.ndarray, ranked_factors: np.ndarray, compare: np.ndarray, k: int) -> np.ndarray:
    """context@k = (1/k) * sum_{i<=k} mean_{f in C(q)} 1[f(r_i) = f(q)], per query.

    C(q) = the factors that are *not* conditioned (``compare[q, f]`` True). Shapes:
    ``query_factors`` (Q, F), ``ranked_factors`` (Q, K, F), ``compare`` (Q, F).

    >>> q = np.array([[0, 1, 2]]); r = np.array([[[0, 1, 5], [0, 9, 9]]])
    >>> context_at_k(q, r, np.array([[False, True, True]]), 2).tolist()
    [0.25]
    """
    r = np.asarray(ranked_factors)[:, :k, :]
    if r.shape[1] < k:
        raise ValueError(f"ranked lists have {r.shape[1]} items, fewer than k={k}")
    same = r == np.asarray(query_factors)[:, None, :]
    c = np.asarray(compare, dtype=bool)[:, None, :]
    n = c.sum(axis=2)
    if np.any(n == 0):
        raise ValueError("a query conditions every factor: no context left to compare")
    return ((same & c).sum(axis=2) / n).mean(axis=1)
