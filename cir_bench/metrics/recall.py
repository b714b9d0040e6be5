"""Hit@k (what CIR papers call "Recall@k") and true recall@k."""
from __future__ import annotations

import numpy as np


def hit_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    """hit@k = 1 if any of the top k is relevant, else 0.

    >>> hit_at_k(np.array([[0, 0, 1], [0, 0, 0]]), 3).tolist()
    [1.0, 0.0]
    """
    return (np.asarray(hits)[:, :k].sum(axis=1) > 0).astype(np.float64)


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """recall@k = sum_{i<=k} hits(i) / R.

    >>> recall_at_k(np.array([[1, 0, 1]]), np.array([4]), 3).tolist()
    [0.5]
    """
    r = np.asarray(n_relevant, dtype=np.float64)
    if np.any(r <= 0):
        raise ValueError("a query has no relevant item (R = 0)")
    return np.asarray(hits, dtype=np.float64)[:, :k].sum(axis=1) / r
