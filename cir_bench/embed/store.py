"""Embedding store: z for every item (eval mode), extracted once and cached by
fingerprint (checkpoint hash, dataset fingerprint, preprocessing). Searching it is the
index stage's job (cir_bench.index)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cir_bench.data.base import Dataset
from cir_bench.data.transforms import ItemImages
from cir_bench.paths import load_or_build, save_torch


@dataclass
class EmbeddingStore:
    """z for every dataset item, row i = ``dataset.items[i]``."""

    ids: list[str]
    z: torch.Tensor  # (N, d) float32, CPU
    fingerprint: str

    def save(self, path: Path) -> None:
        save_torch({"ids": self.ids, "z": self.z.cpu(), "fingerprint": self.fingerprint}, path)

    @classmethod
    def load(cls, path: Path) -> "EmbeddingStore":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(list(data["ids"]), data["z"], data["fingerprint"])


def embedding_fingerprint(checkpoint_hash: str, dataset_fingerprint: str, preprocessing: dict) -> str:
    blob = json.dumps([checkpoint_hash, dataset_fingerprint, preprocessing], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def load_or_extract(cache_dir: Path, fingerprint: str, extract: Callable[[], torch.Tensor], ids: list[str],
                    on_damaged: str = "rebuild") -> tuple[EmbeddingStore, bool]:
    """Return the cached store for ``fingerprint`` (checked against its checksum) or build,
    save and return it. The bool says whether the cache was hit."""
    path = store_path(cache_dir, fingerprint)

    def load(p: Path) -> EmbeddingStore | None:  # a store of other items is not this one
        store = EmbeddingStore.load(p)
        return store if store.ids == ids and tuple(store.z.shape) == (len(ids), store.z.shape[1]) else None

    def build() -> EmbeddingStore:
        store = EmbeddingStore(ids, extract(), fingerprint)
        store.save(path)
        return store

    return load_or_build(path, load, build, on_damaged)
