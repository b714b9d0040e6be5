"""The heads' view of the database and the two scores that rank by it: one implementation,
called by the offline methods (``filtered_knn``, ``soft_filtered_knn``) and the served index
stage (cir_bench.serving) alike.

    hard:  cos(z0, x) + BONUS · [every predicted label of x is its condition]
    soft:  cos(z0, x) + β · Σ_m log p_m(c_m | x)

BONUS exceeds the range of the cosine ([-1, 1]), so every matching item outranks every other;
the soft score is what ``soft_filtered_knn`` reports, the hard method reports the cosine.
"""
from __future__ import annotations

from typing import Sequence

import torch

BONUS = 3.0
CHUNK = 4096  # database rows per forward pass of a head


def database_labels(head: torch.nn.Module, z_db: torch.Tensor) -> torch.Tensor:
    """(N_db,) the class ``head`` predicts for every database row (eval mode, no gradients)."""
    head = head.eval()
    with torch.no_grad():
        return torch.cat([head(c).argmax(1) for c in z_db.split(CHUNK)])


def database_log_probs(head: torch.nn.Module, z_db: torch.Tensor) -> torch.Tensor:
    """(N_db, C) log p(class | row) of ``head`` for every database row."""
    head = head.eval()
    with torch.no_grad():
        return torch.cat([torch.log_softmax(head(c).float(), dim=1) for c in z_db.split(CHUNK)])


def hard_filter_scores(cosine: torch.Tensor, labels: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """(B, N_db) scores of ``filtered_knn``: ``cosine`` (B, N_db), ``labels`` (N_db, M) the
    predicted (or true) labels of the conditioned properties, ``conditions`` (B, M)."""
    match = (labels[None, :, :] == conditions[:, None, :]).all(dim=2)
    return cosine + BONUS * match


def soft_filter_scores(cosine: torch.Tensor, log_probs: Sequence[torch.Tensor], conditions: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """(B, N_db) scores of ``soft_filtered_knn``: ``log_probs[m]`` (N_db, C_m) of property m,
    ``conditions`` (B, M); β = 0 is the cosine itself."""
    if not beta:
        return cosine
    return cosine + beta * sum(lp.T[conditions[:, m]] for m, lp in enumerate(log_probs))
