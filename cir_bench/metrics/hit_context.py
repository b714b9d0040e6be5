"""Context kept by the *correct* results only (SynthArt, whose generative factors are known)."""
from __future__ import annotations

import numpy as np


def hit_context_at_k(query_factors: np.ndarray, ranked_factors: np.ndarray, compare: np.ndarray,
                     hits: np.ndarray, k: int) -> np.ndarray:
    """hit_context@k = mean over the relevant items r_i among the top k of
    mean_{f in C(q)} 1[f(r_i) = f(q)], per query; NaN when none of the top k is relevant.

    C(q) = the non-conditioned factors (``compare[q, f]`` True). Unlike context@k it is not
    raised by misses: a method that ignores the condition (kNN) keeps the most context with
    the wrong items, which this metric does not count. Shapes: ``query_factors`` (Q, F),
    ``ranked_factors`` (Q, K, F), ``compare`` (Q, F), ``hits`` (Q, K).

    >>> q = np.array([[0, 1, 2]]); r = np.array([[[0, 1, 5], [0, 9, 9]]])
    >>> c = np.array([[False, True, True]])
    >>> hit_context_at_k(q, r, c, np.array([[True, False]]), 2).tolist()
    [0.5]
    >>> hit_context_at_k(q, r, c, np.array([[False, False]]), 2).tolist()
    [nan]
    """
    r = np.asarray(ranked_factors)[:, :k, :]
    if r.shape[1] < k:
        raise ValueError(f"ranked lists have {r.shape[1]} items, fewer than k={k}")
    c = np.asarray(compare, dtype=bool)[:, None, :]
    n = c.sum(axis=2)
    if np.any(n == 0):
        raise ValueError("a query conditions every factor: no context left to compare")
    per_item = ((r == np.asarray(query_factors)[:, None, :]) & c).sum(axis=2) / n  # (Q, k)
    h = np.asarray(hits, dtype=bool)[:, :k]
    n_hits = h.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_hits > 0, (per_item * h).sum(axis=1) / n_hits, np.nan)
