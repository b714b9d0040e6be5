"""Embed stage: z for every dataset item, extracted in-process or with Ray Data, cached by
fingerprint; joining a Ray cluster (``cluster``)."""
from __future__ import annotations

import importlib
from typing import Any

# loaded on first use: `cir_bench.embed.cluster` must not pull torch in (a wrong --address fails
# before the heavy imports)
_EXPORTS = {name: "cir_bench.embed.store" for name in
            ("EmbeddingStore", "embedding_fingerprint", "extract_embeddings", "load_or_extract", "store_path")}

__all__ = ["EmbeddingStore", "embedding_fingerprint", "extract_embeddings", "load_or_extract", "store_path"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
