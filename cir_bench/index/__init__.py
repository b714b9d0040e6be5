"""Search backends over the embedding store: one registry, one interface (``SearchIndex``;
BEIR's split of encoder and search backend).

    exact   ExactIndex: exact cosine top-k in torch, ties to the smaller item id (the default;
            what every metric in this repository is computed with).
    faiss   FaissIndex: cosine top-k with a FAISS index (``faiss.index_factory``); "Flat" is
            exact up to float summation order, "HNSW32" / "IVF256,Flat" are approximate.

Every backend takes ``(z, positions, device, **options)`` and answers
``search(queries, k, exclude) -> (item positions, scores)`` with the self-match left out.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cir_bench.index.base import SearchIndex, mask_rows, rank_scores, result_size, topk_stable, topk_window
from cir_bench.index.exact import ExactIndex
from cir_bench.index.faiss_index import FaissIndex
from cir_bench.registry import Registry

INDEXES: Registry = Registry("index")
INDEXES.register("exact")(ExactIndex)
INDEXES.register("faiss")(FaissIndex)


def build_index(name: str, z: torch.Tensor, positions: np.ndarray, device: torch.device | str = "cpu",
                **options: Any) -> SearchIndex:
    """The backend ``name`` over the database rows ``positions`` of ``z``."""
    return INDEXES.get(name)(z, positions, device, **options)


__all__ = ["INDEXES", "build_index", "SearchIndex", "ExactIndex", "FaissIndex", "mask_rows", "rank_scores",
           "result_size", "topk_stable", "topk_window"]
