"""Exact cosine top-k in torch, tie-stable: the default backend, what every metric in this
repository is computed with."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cir_bench.index.base import DatabaseRows, mask_rows, rank_scores, result_size, topk_window


class ExactIndex(DatabaseRows):
    """Exact cosine top-k over the rows ``positions`` of ``z`` (the retrieval database).

    Queries are processed in chunks so the (chunk x N) similarity matrix bounds memory.
    ``one_sync`` (default: on CUDA): a call queues all its kernels and waits for the device
    once, copying the results into reused page-locked buffers; the rare row whose top-k tie
    straddles the candidate window is redone with the full sort afterwards. Same results as
    the plain path (tested on CPU, where it can be forced).
    """

    def __init__(self, z: torch.Tensor, positions: np.ndarray, device: torch.device | str = "cpu",
                 chunk: int = 1024, one_sync: bool | None = None) -> None:
        super().__init__(positions, z.shape[0])
        self.device = torch.device(device)
        self.z = F.normalize(z[torch.as_tensor(self.positions)].to(self.device, torch.float32), dim=1)
        self.chunk = chunk
        self._positions_t = torch.as_tensor(self.positions, device=self.device)
        self.one_sync = self.device.type == "cuda" if one_sync is None else bool(one_sync)
        self._host: dict[str, torch.Tensor] = {}  # reused result buffers (page-locked on CUDA)

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A host buffer shaped like ``like``, grown when too small, reused across calls."""
        have = self._host.get(name)
        if have is None or have.numel() < like.numel() or have.dtype != like.dtype:
            have = torch.empty(max(like.numel(), 1024), dtype=like.dtype, pin_memory=self.device.type == "cuda")
            self._host[name] = have
        return have[: like.numel()].view(like.shape)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item positions and cosine scores for each query row.

        ``exclude``: one item position per query to leave out (-1 for none): the self-match.
        """
        k = result_size(k, len(self), exclude)
        if self.one_sync:
            return self._search_one_sync(queries, k, exclude)
        q = F.normalize(queries.to(self.device, torch.float32), dim=1)
        ex_local = torch.as_tensor(self.local(exclude), device=self.device) if exclude is not None else None
        out_pos, out_score = [], []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start:start + self.chunk] @ self.z.T
            idx, score = rank_scores(sim, k, None if ex_local is None else ex_local[start:start + self.chunk])
            out_pos.append(self._positions_t[idx])
            out_score.append(score)
        return torch.cat(out_pos).cpu(), torch.cat(out_score).cpu()

    def _search_one_sync(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(queries.to(self.device, torch.float32, non_blocking=True), dim=1)
        ex_local = torch.as_tensor(self.local(exclude)).to(self.device, non_blocking=True) \
            if exclude is not None else None
        pos_parts, score_parts, spill_parts = [], [], []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start:start + self.chunk] @ self.z.T
            mask_rows(sim, None if ex_local is None else ex_local[start:start + self.chunk])
            idx, score, spill = topk_window(sim, k)
            pos_parts.append(self._positions_t[idx])
            score_parts.append(score)
            spill_parts.append(spill if spill is not None else torch.zeros(idx.shape[0], dtype=torch.bool,
                                                                          device=self.device))
        results = [torch.cat(pos_parts), torch.cat(score_parts), torch.cat(spill_parts)]
        host = [self._buffer(name, t) for name, t in zip(("pos", "score", "spill"), results)]
        for h, t in zip(host, results):
            h.copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one wait of this call
        pos, score, spill = host[0].clone(), host[1].clone(), host[2]
        if bool(spill.any()):  # a tie straddles the window edge: these rows with the full sort
            rows = torch.nonzero(spill).flatten()
            sim = q[rows.to(self.device)] @ self.z.T
            idx, vals = rank_scores(sim, k, None if ex_local is None else ex_local[rows.to(self.device)])
            pos[rows], score[rows] = self._positions_t[idx].cpu(), vals.cpu()
        return pos, score
