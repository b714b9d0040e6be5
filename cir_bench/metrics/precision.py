"""Precision at k, the paper's "mAP@k"."""
from __future__ import annotations

import numpy as np


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """precision@k = (1/k) * sum_{i<=k} hits(i), per query.

    This is what the paper (and the authors' code) calls "mAP@10": no rank weighting,
    normalised by k. ``hits`` is a (Q, >=k) 0/1 matrix of the ranked lists.

    >>> precision_at_k(np.array([[1, 0, 1, 0]]), 4).tolist()
    [0.5]
    """
    hits = np.asarray(hits, dtype=np.float64)
    if hits.shape[1] < k:
        raise ValueError(f"ranked lists have {hits.shape[1]} items, fewer than k={k}")
    return hits[:, :k].sum(axis=1) / k
