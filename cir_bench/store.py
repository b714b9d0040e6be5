"""Embedding store: extract z for every item (eval mode), cache it by fingerprint, and
search it with exact cosine top-k.

Policies (metrics.md): the query's own id is excluded before ranking unless
``self_match="keep"``; ties in score are broken by item position ascending, and items are
kept sorted by id, so ties go to the smaller id.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cir_bench.data.base import Dataset
from cir_bench.data.transforms import ItemImages


@dataclass
class EmbeddingStore:
    """z for every dataset item, row i = ``dataset.items[i]``."""

    ids: list[str]
    z: torch.Tensor  # (N, d) float32, CPU
    fingerprint: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"ids": self.ids, "z": self.z.cpu(), "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "EmbeddingStore":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(list(data["ids"]), data["z"], data["fingerprint"])


def embedding_fingerprint(checkpoint_hash: str, dataset_fingerprint: str, preprocessing: dict) -> str:
    blob = json.dumps([checkpoint_hash, dataset_fingerprint, preprocessing], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, dataset: Dataset, transform: Callable, device: torch.device,
                       batch_size: int = 256, num_workers: int = 0) -> torch.Tensor:
    model.eval()
    loader = torch.utils.data.DataLoader(
        ItemImages(dataset, np.arange(len(dataset)), transform, properties=[]),
        batch_size=batch_size, num_workers=num_workers,
    )
    out = [model.embed(x.to(device)).float().cpu() for x, _ in loader]
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


def store_path(cache_dir: Path, fingerprint: str) -> Path:
    """Where the store with ``fingerprint`` is cached."""
    return Path(cache_dir) / "embeddings" / f"{fingerprint}.pt"


def load_or_extract(cache_dir: Path, fingerprint: str, extract: Callable[[], torch.Tensor], ids: list[str]
                    ) -> tuple[EmbeddingStore, bool]:
    """Return the cached store for ``fingerprint`` or build, save and return it.

    The bool says whether the cache was hit.
    """
    path = store_path(cache_dir, fingerprint)
    if path.exists():
        store = EmbeddingStore.load(path)
        if store.ids == ids:
            return store, True
    store = EmbeddingStore(ids, extract(), fingerprint)
    store.save(path)
    return store, False


class CosineIndex:
    """Exact cosine top-k over a subset of the store (the retrieval database).

    ``z`` holds every item of the store; ``positions`` (sorted) picks the database rows.

    Queries are processed in chunks so the (chunk x N) similarity matrix bounds memory.
    """

    def __init__(self, z: torch.Tensor, positions: np.ndarray, device: torch.device | str = "cpu",
                 chunk: int = 1024) -> None:
        self.device = torch.device(device)
        self.positions = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=self.device)
        if not bool((self.positions[1:] > self.positions[:-1]).all()):
            raise ValueError("database positions must be strictly increasing (the tie-break order)")
        if len(positions) and int(positions[-1]) >= z.shape[0]:
            raise ValueError(f"store has {z.shape[0]} rows but the database names position {positions[-1]}")
        self.z = F.normalize(z[torch.as_tensor(np.asarray(positions))].to(self.device, torch.float32), dim=1)
        self.chunk = chunk
        self._rank_of = {int(p): i for i, p in enumerate(positions)}

    def __len__(self) -> int:
        return self.positions.numel()

    def local(self, positions: np.ndarray) -> np.ndarray:
        """Row in the database for each item position (-1 where the item is not in it)."""
        return np.array([self._rank_of.get(int(p), -1) for p in positions], dtype=np.int64)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k item positions and cosine scores for each query row.

        ``exclude``: one item position per query to leave out (-1 for none): the self-match.
        """
        n = len(self)
        k = min(k, n - (1 if exclude is not None else 0))
        q = F.normalize(queries.to(self.device, torch.float32), dim=1)
        ex_local = None
        if exclude is not None:
            ex_local = torch.as_tensor(self.local(exclude), device=self.device)
        out_pos, out_score = [], []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start:start + self.chunk] @ self.z.T
            if ex_local is not None:
                ex = ex_local[start:start + self.chunk]
                rows = torch.nonzero(ex >= 0).flatten()
                sim[rows, ex[rows]] = float("-inf")
            idx, score = topk_stable(sim, k)
            out_pos.append(self.positions[idx])
            out_score.append(score)
        return torch.cat(out_pos).cpu(), torch.cat(out_score).cpu()


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
    # order the window by (score desc, column asc): sort by column, then stable by score
    col_order = torch.argsort(idx, dim=1)
    idx = torch.gather(idx, 1, col_order)
    vals = torch.gather(vals, 1, col_order)
    score_order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    idx = torch.gather(idx, 1, score_order)[:, :k]
    vals = torch.gather(vals, 1, score_order)[:, :k]
    return idx, vals
