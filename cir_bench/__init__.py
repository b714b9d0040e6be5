"""cir-bench: conditional image retrieval benchmark suite (Backward Search and baselines)."""

__version__ = "0.1.0"
