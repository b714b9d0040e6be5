"""Judging two results the way a user does, not bit for bit.

Float results differ in the last bits between CPUs (AVX2 vs AVX-512 kernels), thread counts
and batch sizes, and Backward Search's Adam steps magnify that (its first step is
lr * g / (|g| + eps): a 1e-7 change in a small gradient component moves z by up to lr). So two
computations of the same search are "the same" when:

- their top-k lists are identical except where items are near-tied: two items may swap
  (in order, or across the k-th place) only if their cosine scores differ by at most ``tie``;
- their scores agree within a tolerance derived from the computation: for unit vectors,
  |cos(a, x) - cos(b, x)| <= ||a - b||, so scores of two query vectors can differ by at most
  the distance between the (normalised) queries, plus float32 rounding;
- Backward Search's iteration counts agree within one step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

#: float32 rounding of a cosine score over d <= 1024 terms: d * eps32 (1.2e-7) ~ 1e-4 at most;
#: scores computed the same way on the same rows agree far closer (~1e-6).
SCORE_TOL = 1e-5


def near_tie_equal(ids_a: Sequence, scores_a: Sequence[float], ids_b: Sequence, scores_b: Sequence[float],
                   tie: float = SCORE_TOL) -> bool:
    """True when two ranked lists are identical except at near-ties within ``tie``."""
    ids_a, ids_b = list(ids_a), list(ids_b)
    if ids_a == ids_b:
        return True
    sa = dict(zip(ids_a, map(float, scores_a)))
    sb = dict(zip(ids_b, map(float, scores_b)))
    kth_a, kth_b = min(sa.values()), min(sb.values())
    # items in one list only: they must sit at the boundary, tied with the other's k-th item
    for item in set(ids_a) - set(ids_b):
        if sa[item] > kth_b + tie:
            return False
    for item in set(ids_b) - set(ids_a):
        if sb[item] > kth_a + tie:
            return False
    # common items ranked in a different order: only if their scores are tied
    common = [i for i in ids_a if i in sb]
    order_b = {item: r for r, item in enumerate(ids_b)}
    for x in range(len(common)):
        for y in range(x + 1, len(common)):
            i, j = common[x], common[y]
            if order_b[i] > order_b[j] and abs(sa[i] - sa[j]) > tie and abs(sb[i] - sb[j]) > tie:
                return False
    return True


def overlap(ids_a: Sequence, ids_b: Sequence) -> float:
    return len(set(ids_a) & set(ids_b)) / max(len(ids_a), 1)


def assert_same_rankings(a_ids, a_scores, b_ids, b_scores, tie: float = SCORE_TOL, min_identical: float = 1.0,
                         min_overlap: float = 1.0, score_tol: float | None = None, what: str = "") -> None:
    """Every query's lists equal up to near-ties (at least ``min_identical`` of the queries;
    every query overlapping at least ``min_overlap``), and the scores of items both lists
    hold agree within ``score_tol`` (default ``tie``)."""
    a_ids, b_ids = [list(r) for r in a_ids], [list(r) for r in b_ids]
    assert len(a_ids) == len(b_ids), f"{what}: {len(a_ids)} vs {len(b_ids)} queries"
    same = [near_tie_equal(a, sa, b, sb, tie) for a, sa, b, sb in zip(a_ids, a_scores, b_ids, b_scores)]
    ov = [overlap(a, b) for a, b in zip(a_ids, b_ids)]
    tol = tie if score_tol is None else score_tol
    for q, (a, sa, b, sb) in enumerate(zip(a_ids, a_scores, b_ids, b_scores)):
        da, db = dict(zip(a, map(float, sa))), dict(zip(b, map(float, sb)))
        for item in set(da) & set(db):
            assert abs(da[item] - db[item]) <= tol, f"{what} query {q}: item {item} score {da[item]} vs {db[item]}"
    assert np.mean(same) >= min_identical, f"{what}: {int(np.sum(same))}/{len(same)} lists equal up to near-ties"
    assert min(ov, default=1.0) >= min_overlap, f"{what}: top-k overlap down to {min(ov):.2f}"


def normalised_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a/|a| - b/|b||| per row: the most any cosine score can move between the two."""
    return (torch.nn.functional.normalize(a.float(), dim=-1) - torch.nn.functional.normalize(b.float(), dim=-1)
            ).norm(dim=-1)
