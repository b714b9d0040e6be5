"""Domain-conversion metrics (FreeDom, WACV 2025; BASIC, NeurIPS 2025): a result is correct
when it has the query's *class* and satisfies every condition (the target domain), and the
ranking is judged over the whole database, not only its top k.

``correct`` is a (Q, N) 0/1 matrix over each query's full ranking (best first);
``n_correct`` (Q,) is R, the number of correct items in the database (by default the row sums:
a correct item the ranking leaves out counts as never retrieved when R is given).
"""
from __future__ import annotations

import numpy as np


def trapezoidal_ap(correct_row: np.ndarray, n_correct: int | None = None) -> float:
    """Average precision of one full ranking, by the trapezoidal rule of the revisited
    Oxford/Paris evaluation (``compute_ap``), which FreeDom reports as mAP:

    AP = Σ_j (1/R) · (P0_j + P1_j) / 2, over the correct items j = 0..R-1 in rank order,
    r_j their 0-based ranks, P0_j = j / r_j (1 when r_j = 0), P1_j = (j + 1) / (r_j + 1).

    R = ``n_correct`` (default: the correct items of the row); 0 when R = 0.

    >>> round(trapezoidal_ap(np.array([1, 0, 1, 0])), 4)
    0.7917
    >>> trapezoidal_ap(np.array([1, 1, 0]))
    1.0
    """
    ranks = np.flatnonzero(np.asarray(correct_row, dtype=bool))
    total = ranks.size if n_correct is None else int(n_correct)
    if total < ranks.size:
        raise ValueError(f"n_correct = {total} is fewer than the {ranks.size} correct items ranked")
    if total == 0:
        return 0.0
    j = np.arange(ranks.size, dtype=np.float64)
    safe = np.where(ranks == 0, 1, ranks)
    p0 = np.where(ranks == 0, 1.0, j / safe)
    p1 = (j + 1) / (ranks + 1)
    return float(((p0 + p1) / 2).sum() / total)


def dc_map(correct: np.ndarray, n_correct: np.ndarray | None = None) -> np.ndarray:
    """Per query, the trapezoidal AP of ``trapezoidal_ap`` over the full ranking; the mean
    over queries is FreeDom's mAP.

    >>> dc_map(np.array([[1, 0, 1, 0], [0, 0, 0, 1]])).round(4).tolist()
    [0.7917, 0.125]
    """
    rows = np.asarray(correct)
    totals = [None] * len(rows) if n_correct is None else np.asarray(n_correct)
    return np.array([trapezoidal_ap(row, total) for row, total in zip(rows, totals)], dtype=np.float64)


def dc_precision_at_k(correct: np.ndarray, k: int, n_correct: np.ndarray | None = None) -> np.ndarray:
    """P@k = Σ_{i≤k} correct(i) / min(R, k), R = the correct items in the whole ranking
    (FreeDom's P@k: a query with fewer than k correct items can still score 1); 0 when R = 0.

    >>> dc_precision_at_k(np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]]), 2).tolist()
    [0.5, 1.0]
    """
    c = np.asarray(correct, dtype=np.float64)
    if c.shape[1] < k:
        raise ValueError(f"ranked lists have {c.shape[1]} items, fewer than k={k}")
    n_total = c.sum(axis=1) if n_correct is None else np.asarray(n_correct, dtype=np.float64)
    top = c[:, :k].sum(axis=1)
    denom = np.minimum(n_total, k)
    return np.divide(top, denom, out=np.zeros_like(top), where=denom > 0)


def dc_recall_at_k(correct: np.ndarray, k: int, n_correct: np.ndarray | None = None) -> np.ndarray:
    """R@k = Σ_{i≤k} correct(i) / R over the full ranking (FreeDom's R@k); 0 when R = 0.

    >>> dc_recall_at_k(np.array([[1, 0, 1, 0, 0]]), 2).tolist()
    [0.5]
    """
    c = np.asarray(correct, dtype=np.float64)
    if c.shape[1] < k:
        raise ValueError(f"ranked lists have {c.shape[1]} items, fewer than k={k}")
    n_total = c.sum(axis=1) if n_correct is None else np.asarray(n_correct, dtype=np.float64)
    top = c[:, :k].sum(axis=1)
    return np.divide(top, n_total, out=np.zeros_like(top), where=n_total > 0)
