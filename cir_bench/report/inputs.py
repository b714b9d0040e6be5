"""What ``cir-bench report`` is given, sorted by kind, each read from its written files.

- a run (``cir-bench run``) or compare directory: manifest.json, metrics.csv, results.parquet,
  items.parquet (compare.json too for a compare);
- a Tune experiment: its ``report/`` folder (or the experiment folder above it) holding
  tune_results.parquet;
- a load test: a folder holding loadtest.json, or that file;
- a benchmark: the JSON ``benchmarks/backward_search.py`` prints, saved to a file.

Anything else is refused with the file that is missing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cir_bench.results import check_run_files

RUN_FILES = ("manifest.json", "metrics.csv", "results.parquet", "items.parquet")


class ReportInputError(ValueError):
    """An input of ``cir-bench report`` that is not one of the outputs it knows."""


@dataclass
class RunFiles:
    """One run or compare directory, read back."""

    path: Path
    manifest: dict[str, Any]
    metrics: pd.DataFrame
    results: pd.DataFrame
    items: pd.DataFrame
    compare: dict[str, Any] | None = None
    map_points: pd.DataFrame | None = None
    lambda_curve: pd.DataFrame | None = None  # lambda_curve.parquet: the run's search beside Eq 4 converged

    @property
    def is_compare(self) -> bool:
        return self.compare is not None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def lam(self) -> float:
        """The run's λ (the ``search`` section's): the Backward Search the student imitates."""
        return float(self.manifest.get("config", {}).get("search", {}).get("lam", 0.0))

    @property
    def k(self) -> int:
        return int(self.manifest.get("config", {}).get("eval", {}).get("k", 10))


@dataclass
class ReportInputs:
    runs: list[RunFiles] = field(default_factory=list)
    tunes: list[tuple[Path, pd.DataFrame]] = field(default_factory=list)
    loadtests: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    benchmarks: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)


def _read(path: Path, read):
    try:
        return read(path)
    except Exception as err:  # noqa: BLE001 -- any parse error: name the file
        raise ReportInputError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None


def _json(path: Path) -> Any:
    return _read(path, lambda p: json.loads(p.read_text(encoding="utf-8")))


def read_run(path: Path) -> RunFiles:
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise ReportInputError(f"{path}: not a complete run directory: missing {', '.join(missing)} "
                               f"(a run has {', '.join(RUN_FILES)})")
    manifest = _json(path / "manifest.json")
    if not isinstance(manifest, dict) or "dataset" not in manifest:
        raise ReportInputError(f"{path / 'manifest.json'}: no 'dataset' entry; not a cir-bench manifest")
    changed = check_run_files(path, manifest)
    if changed:
        raise ReportInputError(f"{path}: {', '.join(changed)} not the file(s) manifest.json describes (written "
                               "by another run after it, or changed since); run again to get one consistent run")
    metrics = _read(path / "metrics.csv", pd.read_csv)
    for key in ("query_set", "method"):
        if key not in metrics.columns:
            raise ReportInputError(f"{path / 'metrics.csv'}: no '{key}' column; not a cir-bench metrics file")
    results = _read(path / "results.parquet", pd.read_parquet)
    items = _read(path / "items.parquet", pd.read_parquet)
    compare = _json(path / "compare.json") if (path / "compare.json").is_file() else None
    points = _read(path / "map_points.parquet", pd.read_parquet) if (path / "map_points.parquet").is_file() else None
    curve = (_read(path / "lambda_curve.parquet", pd.read_parquet) if (path / "lambda_curve.parquet").is_file()
             else None)
    return RunFiles(path, manifest, metrics, results, items, compare, points, curve)


def classify(paths: list[Path]) -> ReportInputs:
    """Sort the given paths by kind; an unknown one fails naming what it lacks."""
    out = ReportInputs()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportInputError(f"{path}: no such file or directory")
        if path.is_file():
            if path.name == "loadtest.json":
                out.loadtests.append((path, _loadtest(path)))
            elif path.name == "tune_results.parquet":
                out.tunes.append((path.parent, _read(path, pd.read_parquet)))
            elif path.suffix == ".json":
                data = _json(path)
                if isinstance(data, dict) and isinstance(data.get("query_sets"), dict):
                    out.benchmarks.append((path, data))
                elif isinstance(data, dict) and "stages" in data:
                    out.loadtests.append((path, _loadtest(path)))
                else:
                    raise ReportInputError(f"{path}: a JSON file that is neither a load test (loadtest.json) nor "
                                           "the output of benchmarks/backward_search.py (no 'query_sets')")
            else:
                raise ReportInputError(f"{path}: give a run directory, a tune report folder, a load test folder "
                                       "or a benchmark JSON file")
            continue
        if (path / "manifest.json").is_file() or (path / "metrics.csv").is_file():
            out.runs.append(read_run(path))
        elif (path / "tune_results.parquet").is_file():
            out.tunes.append((path, _read(path / "tune_results.parquet", pd.read_parquet)))
        elif (path / "report" / "tune_results.parquet").is_file():
            out.tunes.append((path / "report", _read(path / "report" / "tune_results.parquet", pd.read_parquet)))
        elif (path / "loadtest.json").is_file():
            out.loadtests.append((path / "loadtest.json", _loadtest(path / "loadtest.json")))
        else:
            raise ReportInputError(
                f"{path}: not a run directory (missing {', '.join(RUN_FILES)}), nor a tune report "
                "(missing tune_results.parquet), nor a load test (missing loadtest.json)")
    return out


def _loadtest(path: Path) -> dict[str, Any]:
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ReportInputError(f"{path}: no 'stages' list; not a cir-bench loadtest.json")
    return data
