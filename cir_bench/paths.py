"""Where cir-bench keeps its cache (datasets, checkpoints, embeddings, query sets, students)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CIR_BENCH_CACHE`` if set, else ``~/.cache/cir-bench``."""
    return Path(os.environ.get("CIR_BENCH_CACHE") or Path.home() / ".cache" / "cir-bench")
