"""The one search-backend interface, and the one place where the self-match is masked and
ties are broken.

Policies (docs/metrics.md): the query's own item is left out before ranking unless the run
keeps it (``self_match="keep"``); ties in score go to the smaller database row, and rows are
sorted by item position (= item id order), so ties go to the smaller id.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class SearchIndex(Protocol):
    """Cosine top-k over the database rows of an embedding store.

    ``positions``: the item positions of the database rows, strictly increasing.
    ``z``: the L2-normalised database rows (methods that rank the whole database themselves,
    such as filtered kNN, read them and stay exact whatever the backend).
    """

    positions: np.ndarray
    z: torch.Tensor
    device: torch.device
    chunk: int

    def __len__(self) -> int: ...

    def local(self, positions: np.ndarray) -> np.ndarray: ...

    def search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]: ...


class DatabaseRows:
    """Item position <-> database row bookkeeping shared by the backends."""

    def __init__(self, positions: np.ndarray, n_items: int) -> None:
        self.positions = np.asarray(positions, dtype=np.int64)
        if len(self.positions) > 1 and not bool((self.positions[1:] > self.positions[:-1]).all()):
            raise ValueError("database positions must be strictly increasing (the tie-break order)")
        if len(self.positions) and int(self.positions[-1]) >= n_items:
            raise ValueError(f"store has {n_items} rows but the database names position {self.positions[-1]}")
        self._row_of = {int(p): i for i, p in enumerate(self.positions)}

    def __len__(self) -> int:
        return len(self.positions)

    def local(self, positions: np.ndarray) -> np.ndarray:
        """Database row of each item position (-1 where the item is not in the database)."""
        return np.array([self._row_of.get(int(p), -1) for p in np.asarray(positions).ravel()], dtype=np.int64)


def result_size(k: int, n_rows: int, exclude: np.ndarray | None) -> int:
    """How many results a query can get: k, at most the database less the excluded item."""
    return min(k, n_rows - (1 if exclude is not None else 0))


def mask_rows(scores: torch.Tensor, local_rows: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """Set ``scores[i, local_rows[i]]`` to -inf in place where ``local_rows[i] >= 0``: the
    self-match of query i (rows outside the database are -1 and left alone). No host sync:
    every row writes (-inf, or its own score back), so it stays queued on a GPU."""
    if local_rows is None:
        return scores
    rows = torch.as_tensor(np.asarray(local_rows) if not torch.is_tensor(local_rows) else local_rows,
                           device=scores.device).long().view(-1, 1)
    valid = rows >= 0
    safe = torch.where(valid, rows, torch.zeros_like(rows))
    current = scores.gather(1, safe)
    scores.scatter_(1, safe, torch.where(valid, torch.full_like(current, float("-inf")), current))
    return scores


def topk_window(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The top-k of each row ordered by (score desc, column asc) from a window of k + 16
    candidates, without a host sync, and per row whether a tie may straddle the window's edge
    (then that row needs the full stable sort: ``topk_stable`` does it; None when the window is
    the whole row)."""
    n = sim.shape[1]
    window = min(n, k + 16)
    vals, idx = torch.topk(sim, window, dim=1)
    spill = vals[:, window - 1] >= vals[:, k - 1] if window < n else None
    idx, vals = _order_window(idx, vals, k)
    return idx, vals, spill


def _order_window(idx: torch.Tensor, vals: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # order the window by (score desc, column asc): sort by column, then stable by score
    col_order = torch.argsort(idx, dim=1)
    idx = torch.gather(idx, 1, col_order)
    vals = torch.gather(vals, 1, col_order)
    score_order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(idx, 1, score_order)[:, :k], torch.gather(vals, 1, score_order)[:, :k]


def topk_stable(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by score descending, ties by column ascending (deterministic on any device)."""
    n = sim.shape[1]
    window = min(n, k + 16)
    vals, idx = torch.topk(sim, window, dim=1)
    # A tie can straddle the window edge only if the last kept value equals the k-th one.
    if window < n:
        spill = vals[:, window - 1] >= vals[:, k - 1]
        if bool(spill.any()):
            rows = torch.nonzero(spill).flatten()
            full_idx = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :window]
            idx[rows] = full_idx
            vals[rows] = torch.gather(sim[rows], 1, full_idx)
    return _order_window(idx, vals, k)


def rank_scores(scores: torch.Tensor, k: int, local_rows: torch.Tensor | np.ndarray | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask the self-matches, then the stable top-k rows and their scores: what every method
    that scores the whole database (exact index, filtered kNN, image+text baselines) calls."""
    mask_rows(scores, local_rows)
    return topk_stable(scores, k)
