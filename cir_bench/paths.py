"""Files on disk, the one place for each concern every stage shares:

- ``cache_root``: where cir-bench keeps datasets, checkpoints, embeddings, query sets,
  students, baseline galleries and (by default) baseline/backbone weights;
- ``atomic_write`` / ``save_torch``: write a file under a temporary name and rename it into
  place, so a crashed or concurrent run never leaves a half-written file under the final name;
- ``file_sha256``: the content hash that cache keys and manifests record.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def cache_root(explicit: str | Path | None = None) -> Path:
    """``explicit`` (``cache_dir`` of the config, ``--cache-dir``) if given, else
    ``$CIR_BENCH_CACHE``, else ``~/.cache/cir-bench``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("CIR_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cir-bench"


def default_cache_dir() -> Path:
    """The cache root when no config names one (kept for callers that have no config)."""
    return cache_root(None)


def default_weights_dir() -> Path:
    """Where weights files are looked for when neither a flag nor ``$CIR_BENCH_WEIGHTS``
    names a folder: ``<cache root>/weights`` (``~/.cache/cir-bench/weights`` by default)."""
    return cache_root(None) / "weights"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``
    (``os.replace`` is atomic on one filesystem), on error remove it.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a" / "x.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['x.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically. The archive is built in memory, so its bytes do not depend
    on the file's (temporary) name: identical payloads give identical files, in any process,
    and content-addressed caches keyed on them are shared."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
