"""Result files: the interface between computing and reporting.

- ``results.parquet``: one row per (method, query): query id, conditions, ranked item ids,
  scores, plus the per-query metric values;
- ``metrics.csv``: one row per method, one column per metric (micro means) and ms/query;
- ``items.parquet``: one row per dataset item (id, split, labels, tags), so every metric
  can be recomputed from these files alone;
- ``queries.parquet``: the query set;
- ``map_points.parquet`` (runs of ``cir-bench run``): embeddings for the report's map, a
  seeded database sample, the queries' z0 and each moving method's z* (role, item_id,
  query_set, method, query_id, z);
- ``manifest.json``: config, seed, policies, package versions, git revision, dataset
  fingerprint, device, checkpoint and embedding identities, training history.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from cir_bench.paths import atomic_write, file_sha256

RESULT_FILES = ("results.parquet", "metrics.csv", "items.parquet", "manifest.json")
PACKAGES = ("cir-bench", "torch", "torchvision", "numpy", "pandas", "pyarrow", "scikit-learn", "pillow", "ray",
            "seaborn", "matplotlib", "jinja2")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict[str, Any]:
    """The CPU model (float results depend on its kernels), logical CPUs and platform."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def git_revision(path: Path | None = None) -> dict[str, Any]:
    """HEAD of the checkout holding the code, and whether it has uncommitted changes."""
    where = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None}


def write_run(out: Path, results: pd.DataFrame, metrics: pd.DataFrame, items: pd.DataFrame,
              manifest: dict[str, Any], extra: dict[str, pd.DataFrame] | None = None) -> None:
    """Write the four run files (and ``extra`` parquet files, e.g. map_points.parquet), each
    atomically. A previous run's manifest is removed first and the new one, holding each
    file's sha256, written last: a directory with a manifest holds one complete run, and a
    write cut short leaves none (``check_run_files`` tells the two apart)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for name, frame in (extra or {}).items():
        with atomic_write(out / name) as tmp:
            frame.to_parquet(tmp, index=False)
    with atomic_write(out / "results.parquet") as tmp:
        results.to_parquet(tmp, index=False)
    with atomic_write(out / "metrics.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    with atomic_write(out / "items.parquet") as tmp:
        items.to_parquet(tmp, index=False)
    names = [*RESULT_FILES[:-1], *(extra or {})]
    manifest = {**manifest, "packages": package_versions(), "git": git_revision(), "host": host_info(),
                "command": sys.argv, "files": [*RESULT_FILES, *(extra or {})],
                "sha256": {name: file_sha256(out / name) for name in names}}
    with atomic_write(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=str))


def check_run_files(out: Path, manifest: dict[str, Any]) -> list[str]:
    """The files whose bytes are not those the manifest recorded (a folder where another run's
    files were written after it); empty when they all agree or the manifest predates
    checksums."""
    return [name for name, digest in (manifest.get("sha256") or {}).items()
            if not (out / name).is_file() or file_sha256(out / name) != digest]


def format_metrics_table(run_dir: Path, columns: list[str] | None = None) -> str:
    """The terminal table, read back from ``metrics.csv`` (never from in-memory numbers)."""
    df = pd.read_csv(Path(run_dir) / "metrics.csv")
    if columns:
        df = df[[c for c in ["method", *columns] if c in df.columns]]
        df = df.rename(columns=lambda c: c.replace("_at_", "@").replace("retrieved_similarity", "retr_sim")
                       .replace("mean_iterations", "iters").replace("ms_per_query", "ms/q"))
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
