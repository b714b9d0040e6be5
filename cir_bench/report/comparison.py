"""The comparison tables (the paper's Table 4 layout) of ``cir-bench compare`` and
``cir-bench report``, built from the written result files of one or more runs.

A baseline without weights is a row "weights missing: <path>", never numbers. Rows computed
with weights that are not the authors' architecture (e.g. the tiny test weights) carry a mark
and a footnote saying so.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd


HEADLINE_TEMPLATE = "T1"
METRICS = [("precision_at_{k}", "precision@{k} (mAP@{k}, paper def.)"), ("mts_at_{k}", "mTS@{k}"),
           ("ap_at_{k}_R", "AP@{k} (/R)"), ("ap_at_{k}_minRk", "AP@{k} (/min(R,k))"),
           ("ap_at_{k}_hits", "AP@{k} (/hits)"), ("ms_per_query", "ms/query")]


def _read(path: Path, read):
    try:
        return read(path)
    except Exception as err:  # noqa: BLE001 -- any parse error: name the file
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err}); is the run complete?") from None


def _rows(run_dir: Path) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    metrics = _read(run_dir / "metrics.csv", pd.read_csv)
    manifest = _read(run_dir / "manifest.json", lambda p: json.loads(p.read_text()))
    for key in ("query_set", "method", "params"):
        if key not in metrics.columns:
            raise ValueError(f"{run_dir / 'metrics.csv'}: no '{key}' column; not a cir-bench metrics file")
    if not isinstance(manifest, dict) or "dataset" not in manifest:
        raise ValueError(f"{run_dir / 'manifest.json'}: no 'dataset' entry; not a cir-bench manifest")
    compare = run_dir / "compare.json"
    extra = _read(compare, lambda p: json.loads(p.read_text())) if compare.exists() else {}
    return metrics, manifest, extra


def collect(run_dirs: Sequence[Path]) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, str]]:
    """Long table (column = dataset:query set, method, baseline, template, metric values) from
    the written files; the missing baselines; a note per method label that needs one."""
    frames, missing, notes = [], [], {}
    for d in run_dirs:
        metrics, manifest, extra = _rows(Path(d))
        dataset = manifest["dataset"]["name"]
        frame = metrics.copy()
        frame.insert(0, "column", dataset + ":" + frame["query_set"])
        frame.insert(0, "run", str(d))
        params = frame["params"].map(lambda p: json.loads(p) if isinstance(p, str) and p else {})
        frame["baseline"] = params.map(lambda p: p.get("baseline"))
        frame["template"] = params.map(lambda p: p.get("template"))
        frame["row"] = [b if isinstance(b, str) else m for b, m in zip(frame["baseline"], frame["method"])]
        for label, info in manifest.get("methods", {}).items():
            for note in info.get("setup", {}).get("notes", []):
                notes[label.split("[")[0]] = note
        frames.append(frame)
        for m in extra.get("missing", []):
            missing.append({**m, "column": None, "run": str(d)})
    return pd.concat(frames, ignore_index=True), missing, notes


def write_report(run_dirs: Sequence[Path], out: Path, k: int | None = None) -> list[Path]:
    """comparison.md / .csv (wide, headline) / .parquet (long) from the run directories, at
    cutoff ``k`` (default: the first run's ``eval.k``)."""
    long, missing, notes = collect(run_dirs)
    if k is None:
        manifest = json.loads((Path(run_dirs[0]) / "manifest.json").read_text())
        k = int(manifest.get("config", {}).get("eval", {}).get("k", 10))
    columns = list(dict.fromkeys(long["column"]))
    headline = long[(long["template"].isna()) | (long["template"] == HEADLINE_TEMPLATE)]
    metric_cols = [(m.format(k=k), title.format(k=k)) for m, title in METRICS if m.format(k=k) in long]
    wide = headline.pivot_table(index="row", columns="column", values=metric_cols[0][0], aggfunc="first",
                                sort=False)[columns]
    wide["average"] = wide[columns].mean(axis=1)
    for metric, _ in metric_cols[1:]:
        wide[f"{metric} (avg)"] = headline.pivot_table(index="row", columns="column", values=metric,
                                                       aggfunc="first", sort=False)[columns].mean(axis=1)
    wide.insert(0, "status", ["computed"] * len(wide))
    wide.loc[[r for r in wide.index if r in notes], "status"] = "computed with non-author weights (see note)"
    for m in missing:
        wide.loc[m["baseline"], "status"] = "weights missing: " + "; ".join(m["paths"])
    wide.index.name = "method"
    out.mkdir(parents=True, exist_ok=True)
    wide.to_csv(out / "comparison.csv")
    long.to_parquet(out / "comparison.parquet", index=False)
    sig = _significance(run_dirs, metric_cols[0][0])
    sig.to_csv(out / "significance.csv", index=False)
    (out / "comparison.md").write_text(_markdown(wide, long, columns, metric_cols, missing, notes, k)
                                       + _significance_markdown(sig, metric_cols[0][1]))
    return [out / "comparison.md", out / "comparison.csv", out / "comparison.parquet", out / "significance.csv"]


def _significance(run_dirs: Sequence[Path], metric: str) -> pd.DataFrame:
    """Per run: mean and 95 % bootstrap CI over queries, paired tests against Backward Search."""
    from cir_bench.report.stats import run_significance

    frames = []
    for d in run_dirs:
        if (Path(d) / "results.parquet").exists():
            table = run_significance(Path(d), metric)
            table.insert(0, "run", str(d))
            frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _significance_markdown(sig: pd.DataFrame, title: str) -> str:
    if sig.empty:
        return ""
    lines = ["", f"## Uncertainty and significance: {title}", "",
             "Mean over queries with its 95 % bootstrap interval (2,000 resamples, seeded); Δ: the paired "
             "difference to each Backward Search reference over the same queries, p from a two-sided "
             "randomisation test (10,000 sign flips), ✱ where p < 0.05 after Holm's correction over the "
             "methods compared with that reference in the query set.", ""]
    for (run, query_set), g in sig.groupby(["run", "query_set"], sort=False):
        refs = [r for r in dict.fromkeys(g["reference"]) if isinstance(r, str)]
        lines += [f"**{query_set}** ({run})", "",
                  "| method | mean [95 % CI] | " + " | ".join(f"Δ vs {r} (p, Holm)" for r in refs) + " |",
                  "|---|---|" + "---|" * len(refs)]
        for method, m in g.groupby("method", sort=False):
            first = m.iloc[0]
            cells = []
            for r in refs:
                row = m[m["reference"] == r]
                if row.empty:
                    cells.append("—")
                else:
                    row = row.iloc[0]
                    mark = " ✱" if row["significant"] else ""
                    cells.append(f"{row['difference']:+.3f} ({row['p_value']:.3g}, {row['p_holm']:.3g}){mark}")
            lines.append(f"| {method} | {first['mean']:.3f} [{first['ci_low']:.3f}, {first['ci_high']:.3f}] | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _markdown(wide: pd.DataFrame, long: pd.DataFrame, columns: list[str], metric_cols, missing, notes,
              k: int) -> str:
    main_metric, main_title = metric_cols[0]
    lines = [f"# Comparison: {main_title}", "",
             f"Headline condition text: template {HEADLINE_TEMPLATE} (baselines/condition_text.py); rows are "
             "the mean over each column's queries; `average` is the mean over the columns.", "",
             "| method | " + " | ".join(columns) + " | average |", "|---|" + "---|" * (len(columns) + 1)]
    missing_rows = {m["baseline"] for m in missing}
    for row, r in wide.iterrows():
        if row in missing_rows:
            lines.append(f"| {row} | " + " | ".join([f"weights missing: {'; '.join(m['paths'])}" for m in missing
                                                      if m["baseline"] == row][:1] + [""] * len(columns)) + " |")
            continue
        mark = " †" if row in notes else ""
        lines.append(f"| {row}{mark} | " + " | ".join(_fmt(r[c]) for c in columns) + f" | {_fmt(r['average'])} |")
    lines += ["", f"## Other metrics (average over columns, template {HEADLINE_TEMPLATE})", "",
              "| method | " + " | ".join(t for _, t in metric_cols[1:]) + " |", "|---|" + "---|" * (len(metric_cols) - 1)]
    for row, r in wide.iterrows():
        if row in missing_rows:
            continue
        vals = [_fmt(r[f"{m} (avg)"], 2 if m == "ms_per_query" else 3) for m, _ in metric_cols[1:]]
        lines.append(f"| {row}{' †' if row in notes else ''} | " + " | ".join(vals) + " |")
    spread = long[long["method"].str.contains(r"\[T\d\]", regex=True)]  # template-dependent rows only
    if len(spread):
        lines += ["", f"## Template spread ({main_title}, average over columns)", "",
                  "| baseline | " + " | ".join(sorted(spread["template"].unique())) + " | mean ± std | max |",
                  "|---|" + "---|" * (spread["template"].nunique() + 2)]
        for name, g in spread.groupby("baseline", sort=False):
            per_t = g.groupby("template")[main_metric].mean()
            lines.append(f"| {name} | " + " | ".join(_fmt(per_t.get(t)) for t in sorted(spread["template"].unique()))
                         + f" | {per_t.mean():.3f} ± {per_t.std(ddof=0):.3f} | {per_t.max():.3f} |")
        lines += ["", "Templates: T1 canonical (\"is in X style\", \"is a X\"), T2 imperative (\"make it …\", "
                  "\"change it to …\"), T3 bare label; each wrapped in the method's own prompt "
                  "(Pic2Word `a photo of * , {T}`, SEARLE `a photo of $ that {T}`, CLIP4CIR `{T}`). "
                  "The exact prompts are in results.parquet (column `prompt`)."]
    if notes:
        lines += ["", "† computed, but not with the authors' weights:"] + [f"- {name}: {note}" for name, note in notes.items()]
    return "\n".join(lines) + "\n"
