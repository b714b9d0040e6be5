"""Tag similarity: the paper's mean tag similarity (mTS@k) and the teacher-vs-student
retrieved similarity (Table 6), both Jaccard indices."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def jaccard(a: frozenset | set, b: frozenset | set) -> float:
    """|A n B| / |A u B|, 0 when both are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def mts_at_k(query_tags: Sequence[frozenset], ranked_tags: Sequence[Sequence[frozenset]], k: int) -> np.ndarray:
    """mts@k = (1/k) * sum_{i<=k} J(T(q), T(r_i)), per query (mean over queries = mTS@k).

    >>> mts_at_k([frozenset("ab")], [[frozenset("ab"), frozenset("bc")]], 2).tolist()
    [0.6666666666666666]
    """
    out = np.empty(len(query_tags))
    for q, (tq, ranked) in enumerate(zip(query_tags, ranked_tags)):
        if len(ranked) < k:
            raise ValueError(f"ranked list of query {q} has {len(ranked)} items, fewer than k={k}")
        out[q] = sum(jaccard(tq, t) for t in ranked[:k]) / k
    return out


def retrieved_similarity_at_k(ranked_a: np.ndarray, ranked_b: np.ndarray, k: int) -> np.ndarray:
    """J(top-k ids of method A, top-k ids of method B), per query.

    >>> retrieved_similarity_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3).tolist()
    [0.5]
    """
    a, b = np.asarray(ranked_a)[:, :k], np.asarray(ranked_b)[:, :k]
    if a.shape != b.shape:
        raise ValueError(f"ranked lists differ in shape: {a.shape} vs {b.shape}")
    return np.array([jaccard(set(x.tolist()), set(y.tolist())) for x, y in zip(a, b)])
