"""Exact cosine top-k in torch, tie-stable: the default backend, what every metric in this
repository is computed with."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cir_bench.index.base import DatabaseRows, rank_scores, result_size


class ExactIndex(DatabaseRows):
    """Exact cosine top-k over the rows ``positions`` of ``z`` (the retrieval database).

    Queries are processed in chunks so the (chunk x N) similarity matrix bounds memory.
    """

    def __init__(self, z: torch.Tensor, positions: np.ndarray, device: torch.device | str = "cpu",
                 chunk: int = 1024) -> None:
        super().__init__(positions, z.shape[0])
        self.device = torch.device(device)
        self.z = F.normalize(z[torch.as_tensor(self.positions)].to(self.device, torch.float32), dim=1)
        self.chunk = chunk
        self._positions_t = torch.as_tensor(self.positions, device=self.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item positions and cosine scores for each query row.

        ``exclude``: one item position per query to leave out (-1 for none): the self-match.
        """
        k = result_size(k, len(self), exclude)
        q = F.normalize(queries.to(self.device, torch.float32), dim=1)
        ex_local = torch.as_tensor(self.local(exclude), device=self.device) if exclude is not None else None
        out_pos, out_score = [], []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start:start + self.chunk] @ self.z.T
            idx, score = rank_scores(sim, k, None if ex_local is None else ex_local[start:start + self.chunk])
            out_pos.append(self._positions_t[idx])
            out_score.append(score)
        return torch.cat(out_pos).cpu(), torch.cat(out_score).cpu()
