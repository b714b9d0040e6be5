"""Counterfactual twin metrics: where the exact twin (same scene, only the conditioned
factors changed) lands in the ranking. Defined only for queries whose twin is in the
database (NaN otherwise; averages skip NaN and report the count)."""
from __future__ import annotations

import numpy as np


def twin_rank(ranked: np.ndarray, twin: np.ndarray) -> np.ndarray:
    """1-based rank of the twin in the ranked list; +inf if not retrieved; NaN if no twin.

    >>> twin_rank(np.array([[5, 7, 9], [1, 2, 3], [1, 2, 3]]), np.array([7, 4, -1])).tolist()
    [2.0, inf, nan]
    """
    ranked = np.asarray(ranked)
    out = np.full(len(ranked), np.nan)
    for q, t in enumerate(np.asarray(twin)):
        if t < 0:
            continue
        where = np.flatnonzero(ranked[q] == t)
        out[q] = where[0] + 1.0 if where.size else np.inf
    return out


def twin_hit_at_k(ranked: np.ndarray, twin: np.ndarray, k: int) -> np.ndarray:
    """1 if the twin is in the top k, 0 if not, NaN if the query has no twin.

    >>> twin_hit_at_k(np.array([[5, 7, 9]]), np.array([9]), 2).tolist()
    [0.0]
    """
    rank = twin_rank(np.asarray(ranked)[:, :k], twin)
    return np.where(np.isnan(rank), np.nan, (rank <= k).astype(np.float64))
