"""Which baselines' weights are present under a weights root and usable: every required file
found and checked (size, format, sha256 where pinned), then, unless told not to, the adapter
built from them (keys and shapes). A file that cannot be the weights (an HTML page, a
truncated download, a damaged file) is DAMAGED, with the reason."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from cir_bench_baselines import BASELINES, get_composer
from cir_bench_baselines.base import BadWeightsError, sha256


@dataclass
class WeightsReport:
    name: str
    status: Literal["ready", "MISSING", "DAMAGED"] = "ready"
    lines: list[str] = field(default_factory=list)  # one per file (found / missing / damaged)


def check_weights(root: Path, names: Sequence[str], hash_files: bool = True, load: bool = True) -> list[WeightsReport]:
    """A report per baseline of ``names`` on the files under ``root``."""
    reports = []
    for name in names:
        report = WeightsReport(name)
        for f in BASELINES.get(name).required_files():
            path = f.find(root)
            if path is None:
                report.status = "MISSING" if report.status == "ready" else report.status
                report.lines.append(f"missing  {(root / f.path).resolve()}  ({f.source}; licence: {f.licence})")
                continue
            try:
                f.check(path)
            except BadWeightsError as err:
                report.status = "DAMAGED"
                report.lines.append(f"damaged  {path.resolve()}: {err}")
                continue
            report.lines.append(f"found    {path.resolve()}  {path.stat().st_size:,} bytes  sha256 "
                                f"{sha256(path) if hash_files else '(not computed)'}")
        if report.status == "ready" and load:  # the adapter reads its files: keys and shapes
            try:
                get_composer(name, root, device="cpu")
            except BadWeightsError as err:
                report.status = "DAMAGED"
                report.lines.append(f"damaged  {err}")
        reports.append(report)
    return reports
