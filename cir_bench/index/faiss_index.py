"""Cosine top-k through FAISS (CPU), for stores too large for brute force."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cir_bench.index.base import DatabaseRows, result_size
from cir_bench.registry import import_extra


class FaissIndex(DatabaseRows):
    """A FAISS index built by ``faiss.index_factory`` on the L2-normalised database rows
    (inner product = cosine). Not tie-stable: equal scores may come in any order.

    options: ``factory`` (index_factory string, default "Flat": exact up to float summation
    order; "HNSW32" or "IVF256,Flat" approximate), ``nprobe`` (IVF lists visited),
    ``ef_search`` (HNSW beam), ``seed`` (IVF training sample), ``threads`` (0: FAISS default).
    """

    def __init__(self, z: torch.Tensor, positions: np.ndarray, device: torch.device | str = "cpu",
                 factory: str = "Flat", nprobe: int = 16, ef_search: int = 128, seed: int = 0, threads: int = 0,
                 chunk: int = 1024) -> None:
        faiss = import_extra("faiss", "faiss", "the 'faiss' index")
        super().__init__(positions, z.shape[0])
        if threads:
            faiss.omp_set_num_threads(int(threads))
        x = F.normalize(z[torch.as_tensor(self.positions)].float(), dim=1).cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.factory = factory
        self.index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            rng = np.random.default_rng([seed, 97])
            sample = x[rng.choice(len(x), size=min(len(x), 100_000), replace=False)]  # FAISS asks >= 39 per list
            self.index.train(sample)
        self.index.add(x)
        ivf = faiss.try_extract_index_ivf(self.index) if "IVF" in factory else None
        if ivf is not None:
            ivf.nprobe = int(nprobe)
        if "HNSW" in factory:
            faiss.ParameterSpace().set_index_parameter(self.index, "efSearch", int(ef_search))
        self.chunk = chunk
        # the normalised rows stay readable as a tensor (zero-copy) for methods that rank the
        # whole database themselves (filtered_knn): those stay exact whatever the backend
        self.device = torch.device("cpu")
        self.z = torch.from_numpy(x)

    def search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        k = result_size(k, n, exclude)
        q = np.ascontiguousarray(F.normalize(queries.float(), dim=1).cpu().numpy(), dtype=np.float32)
        extra = 1 if exclude is not None else 0
        scores, rows = self.index.search(q, min(n, k + extra))
        ex_local = self.local(exclude) if exclude is not None else np.full(len(q), -1)
        out_pos = np.empty((len(q), k), dtype=np.int64)
        out_score = np.empty((len(q), k), dtype=np.float32)
        for i in range(len(q)):
            keep = (rows[i] != ex_local[i]) & (rows[i] >= 0)
            r, s = rows[i][keep][:k], scores[i][keep][:k]
            if len(r) < k:  # an approximate index may return fewer than asked (-1 rows)
                raise RuntimeError(f"faiss index '{self.factory}' returned {len(r)} < {k} neighbours; "
                                   "raise nprobe/ef_search")
            out_pos[i], out_score[i] = self.positions[r], s
        return torch.from_numpy(out_pos), torch.from_numpy(out_score)
