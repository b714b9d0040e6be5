"""Embed stage: z for every dataset item, extracted in-process or with Ray Data, cached by
fingerprint."""
from cir_bench.embed.store import EmbeddingStore, embedding_fingerprint, extract_embeddings, load_or_extract, \
    store_path

__all__ = ["EmbeddingStore", "embedding_fingerprint", "extract_embeddings", "load_or_extract", "store_path"]
