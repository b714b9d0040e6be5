"""The search-method seam: (queries, their embeddings, conditions) -> ranked ids and scores.

Every method, embedding-based or image+text, returns a ``Ranking`` over the same
database, so all of them go through the same scoring code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cir_bench.data.base import Dataset
from cir_bench.data.queries import QuerySet
from cir_bench.embed.store import EmbeddingStore
from cir_bench.index.base import SearchIndex


@dataclass
class SearchContext:
    """What a method may use: the dataset (raw images, for image+text methods), the
    embedding store, the database index, the trained model (heads), device and seed."""

    dataset: Dataset
    store: EmbeddingStore
    index: SearchIndex  # exact or FAISS (cir_bench.index)
    database: np.ndarray  # item positions of the retrieval database (sorted)
    device: torch.device
    seed: int
    self_match: str = "exclude"
    model: torch.nn.Module | None = None
    cache: dict[str, Any] = field(default_factory=dict)  # per-run memo (e.g. predicted labels)

    def query_embeddings(self, queries: QuerySet) -> torch.Tensor:
        return self.store.z[torch.as_tensor(queries.positions)]

    def exclude(self, queries: QuerySet) -> np.ndarray | None:
        """The items to leave out of each query's ranking (its own), None when there are none:
        under ``keep``, or when no query is in the database (separate query and database lists)."""
        if self.self_match != "exclude" or not np.isin(queries.positions, self.database).any():
            return None
        return queries.positions


@dataclass
class Ranking:
    positions: np.ndarray  # (Q, k) item positions, best first
    scores: np.ndarray  # (Q, k)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per-query diagnostics
    # (Q, D) the vector each query searched with when the method moves it (Backward Search's
    # z*, the student's output): the run keeps them for the report's map of z0 -> z*
    query_vectors: np.ndarray | None = None


class SearchMethod(ABC):
    """A registered search method. ``needs_images``: it reads raw query images."""

    name: str = "method"
    needs_images: bool = False

    @abstractmethod
    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking: ...

    def setup(self, ctx: SearchContext) -> None:
        """One-off work before the timed search (e.g. a baseline embedding its gallery)."""

    def setup_info(self) -> dict[str, Any]:
        """What setup did (stored in the manifest)."""
        return getattr(self, "info", {})

    def params(self) -> dict[str, Any]:
        """The settings that define this method's output (stored in the manifest)."""
        return {}
