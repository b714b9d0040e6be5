"""Average precision at k, three normalisers (docs/metrics.md): R, min(R, k), and #hits.

All share the numerator sum_{i<=k} P(i) * hits(i), with P(i) the precision at rank i.
"""
from __future__ import annotations

import numpy as np


def _ap_numerator(hits: np.ndarray, k: int) -> np.ndarray:
    h = np.asarray(hits, dtype=np.float64)[:, :k]
    if h.shape[1] < k:
        raise ValueError(f"ranked lists have {h.shape[1]} items, fewer than k={k}")
    prec = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    return (prec * h).sum(axis=1)


def _check_r(n_relevant: np.ndarray) -> np.ndarray:
    r = np.asarray(n_relevant, dtype=np.float64)
    if np.any(r <= 0):
        raise ValueError("a query has no relevant item (R = 0); the query set must guarantee R >= 1")
    return r


def ap_at_k_R(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k / R = sum_{i<=k} P(i)*hits(i) / R  (trec_eval, BEIR, MTEB, ranx ``map@k``).

    >>> ap_at_k_R(np.array([[1, 0, 1]]), np.array([4]), 3).round(4).tolist()
    [0.4167]
    """
    return _ap_numerator(hits, k) / _check_r(n_relevant)


def ap_at_k_minRk(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """AP@k / min(R, k) = sum_{i<=k} P(i)*hits(i) / min(R, k)  (CIRCO's mAP@k).

    >>> ap_at_k_minRk(np.array([[1, 0, 1]]), np.array([4]), 3).round(4).tolist()
    [0.5556]
    """
    return _ap_numerator(hits, k) / np.minimum(_check_r(n_relevant), k)


def ap_at_k_hits(hits: np.ndarray, k: int) -> np.ndarray:
    """AP@k / hits = sum_{i<=k} P(i)*hits(i) / sum_{i<=k} hits(i), 0 without a hit
    (torchmetrics ``RetrievalMAP(top_k=k)``).

    >>> ap_at_k_hits(np.array([[1, 0, 1], [0, 0, 0]]), 3).round(4).tolist()
    [0.8333, 0.0]
    """
    n_hits = np.asarray(hits, dtype=np.float64)[:, :k].sum(axis=1)
    num = _ap_numerator(hits, k)
    return np.divide(num, n_hits, out=np.zeros_like(num), where=n_hits > 0)
