"""``cir-bench report``: report.html (one self-contained file: figures inlined as PNG data,
no script, no request to anywhere) and report.md (the same tables and sentences, its figures
in report_figures/) from the written files of runs, compares, Tune experiments, load tests
and benchmarks. Nothing here reads a number that is not in those files.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cir_bench.paths import atomic_write
from cir_bench.report import figures
from cir_bench.report.frontier import points as frontier_points
from cir_bench.report.frontier import MIN_RANKED_QUERIES, dominance, membership, verdict
from cir_bench.report.inputs import ReportInputs, RunFiles
from cir_bench.report.stats import bootstrap_ci, significance_table
from cir_bench.report.tables import (cell, cost_points, domain_pairs, estimates, methods_by_query_sets,
                                     metrics_of_query_set, params_of, pooled_differences, pooled_over_seeds, seed_groups,
                                     solver_comparison, solver_curve_estimates)


@dataclass
class ReportOptions:
    resamples: int = 2000  # bootstrap resamples for every interval
    seed: int = 0  # bootstraps, randomisation tests, the queries of grids and map
    grid_queries: int = 3  # retrieval grids per query set
    map_queries: int = 6  # queries with arrows in the map
    grid_methods: Sequence[str] | None = None  # default: GRID_DEFAULT present in the run + baselines
    thumbnail: int = 96  # pixels


_SOLVER_NOTE = ("objective: Eq 4 at the returned vector, mean over queries; gap to best: mean(F − best) / mean(best), "
                "best being the lower of the two solvers' objectives for each query (neither solver finds the "
                "global minimiser of heads that are not convex); converged: stationary = the "
                "gradient mapping of the accepted step reached the tolerance, stalled = no step lowered the objective (a kink of a ReLU or "
                "the end of float64's resolution), confident = λ = 0's budget (every condition at the budget "
                "probability), max_iter = the step budget ran out. At λ = 0 Eq 4 has no minimiser: each solver "
                "stops by its own budget.")


GRID_DEFAULT = ("knn", "filtered_knn", "soft_filtered_knn[beta=1]", "backward[lam=0]", "{run}", "student")


@dataclass
class Figure:
    name: str  # file name in report_figures/
    caption: str
    data: bytes

    @property
    def uri(self) -> str:
        mime = "image/jpeg" if self.name.endswith(".jpg") else "image/png"
        return f"data:{mime};base64," + base64.b64encode(self.data).decode()


@dataclass
class Table:
    title: str
    frame: pd.DataFrame
    note: str = ""

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def rows(self) -> list[list[str]]:
        return [[_text(v) for v in row] for row in self.frame.itertuples(index=False)]


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer() and abs(v) < 1e9:
            return str(int(v))  # counts and concurrency levels read back from float columns
        return f"{v:.4g}" if abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def _cost_quality(run: RunFiles, est: pd.DataFrame, k: int) -> Figure | None:
    """ms per query against precision@k (and exact-target recall@k where the dataset has twins):
    Backward Search beside its student, SEARLE's per-image inversion (OTI) beside its network φ.
    The numbers drawn are the time table's and the metric tables'."""
    panels = [(m, t) for m, t in ((f"precision_at_{k}", f"precision@{k}"),
                                  (f"twin_hit_at_{k}", f"exact-target recall@{k}"))
              if not est[est["metric"] == m].empty]
    points = cost_points(run.metrics, est, [m for m, _ in panels])
    if points.empty:
        return None
    pairs = [(_backward(run.lam), "student", "Backward Search → its student"),
             ("searle-oti[T1]", "searle[T1]", "SEARLE: OTI → φ")]
    return Figure("cost_quality.png", f"Cost against quality: ms per query (log; one measurement, the whole "
                  f"query set searched at once: the time table above) against {' and '.join(t for _, t in panels)} "
                  "(bars: 95 % CIs, as in the metric tables); arrows join a per-query optimisation to its one-pass "
                  f"twin; template baselines by their T1 row; under {figures.MIN_MS:g} ms drawn at {figures.MIN_MS:g}",
                  figures.cost_quality(points, pairs, panels))


def _backward(lam: float) -> str:
    return f"backward[lam={float(lam):g}]"


# --------------------------------------------------------------------------- run sections

def _provenance(run: RunFiles) -> dict[str, Any]:
    m = run.manifest
    ds = m.get("dataset", {})
    git = m.get("git", {})
    host = m.get("host", {})
    import yaml

    return {
        "items": [("created", m.get("created")), ("seed", m.get("seed")),
                  ("git revision", (git.get("revision") or "unknown") + (" (uncommitted changes)" if git.get("dirty") else "")),
                  ("dataset", f"{ds.get('name')} · {ds.get('n_items')} items · fingerprint {ds.get('fingerprint')}"),
                  ("device", m.get("device")), ("CPU", host.get("cpu") or "not recorded"),
                  ("CPU kernels", m.get("cpu_capability")), ("torch threads", m.get("torch_threads")),
                  ("logical CPUs", host.get("logical_cpus")), ("platform", host.get("platform")),
                  ("checkpoint", f"{m.get('checkpoint', {}).get('path')} (sha256 {str(m.get('checkpoint', {}).get('sha256'))[:16]}…)"),
                  ("embeddings", m.get("embeddings", {}).get("fingerprint")),
                  ("command", " ".join(map(str, m.get("command", [])))),
                  ("run time", f"{m.get('timings', {}).get('total_s', float('nan')):.0f} s")],
        "packages": ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items() if v),
        "config": yaml.safe_dump(m.get("config", {}), sort_keys=False, default_flow_style=None, width=110),
    }


def _significance(run: RunFiles, metric: str, opts: ReportOptions) -> list[Table]:
    refs = [r for r in dict.fromkeys([_backward(0.0), _backward(run.lam)]) if r in set(run.results["method"])]
    sig = significance_table(run.results, metric, refs, resamples=opts.resamples, seed=opts.seed)
    tables = []
    for query_set, g in sig.groupby("query_set", sort=False):
        rows = []
        for method, m in g.groupby("method", sort=False):
            first = m.iloc[0]
            row = {"method": method, "mean [95 % CI]": cell(first["mean"], first["ci_low"], first["ci_high"])}
            for r in refs:
                hit = m[m["reference"] == r]
                if hit.empty:
                    row[f"Δ vs {r}"] = "—"
                    continue
                h = hit.iloc[0]
                row[f"Δ vs {r}"] = (f"{h['difference']:+.3f} (p {h['p_value']:.3g}, Holm {h['p_holm']:.3g})"
                                    + (" ✱" if h["significant"] else ""))
            rows.append(row)
        tables.append(Table(f"{query_set}: differences to Backward Search ({metric})", pd.DataFrame(rows),
                            "✱: paired randomisation test over this run's queries, p < 0.05 after Holm. It judges "
                            "the query sample only: another training seed (another model and students) moves these "
                            "numbers too; `cir-bench run --seeds 0,1,2` pools seeds and marks only the differences "
                            "that exceed both."))
    return tables


def _curve_points(run: RunFiles, est: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, m in run.metrics.iterrows():
        family = m.get("name")
        if family not in ("backward", "student"):
            continue
        lam = params_of(m).get("lam", run.lam)
        for _, e in est[(est["method"] == m["method"]) & (est["query_set"] == m["query_set"])].iterrows():
            rows.append({"query_set": m["query_set"], "family": family, "param": float(lam), "metric": e["metric"],
                         "mean": e["mean"], "low": e["low"], "high": e["high"]})
    return pd.DataFrame(rows)


def _dataset_images(run: RunFiles, size: int):
    """(image_of(item id) -> thumbnail array, None) or (None, why the images cannot be read)."""
    from cir_bench.data import get_dataset
    from cir_bench.paths import cache_root

    cfg = run.manifest.get("config", {})
    ds_cfg = cfg.get("dataset", {})
    try:
        dataset = get_dataset(ds_cfg.get("name"), ds_cfg.get("root"), ds_cfg.get("options", {}),
                              cache_root(cfg.get("cache_dir")))
    except Exception as err:  # noqa: BLE001 -- the report says why instead of failing
        return None, f"the dataset could not be opened ({type(err).__name__}: {err})"
    if dataset.fingerprint() != run.manifest.get("dataset", {}).get("fingerprint"):
        return None, "the dataset on this machine differs from the run's (fingerprint mismatch)"
    memo: dict[str, np.ndarray] = {}

    def image_of(item: str) -> np.ndarray:
        if item not in memo:
            img = dataset.load_image(dataset.index_of(item)).convert("RGB")
            img.thumbnail((size, size))
            memo[item] = np.asarray(img)
        return memo[item]

    return image_of, None


def _grid_methods(run: RunFiles, opts: ReportOptions) -> list[str]:
    present = list(dict.fromkeys(run.results["method"]))
    wanted = opts.grid_methods or [m.replace("{run}", _backward(run.lam)) for m in GRID_DEFAULT]
    chosen = [m for m in dict.fromkeys(wanted) if m in present]
    if opts.grid_methods is None:  # a compare's baselines at the headline template
        chosen += [m for m in present if m.endswith("[T1]")]
    return chosen


def _grids(run: RunFiles, opts: ReportOptions) -> tuple[list[Figure], str]:
    image_of, why = _dataset_images(run, opts.thumbnail)
    if image_of is None:
        return [], f"Retrieval grids not drawn: {why}."
    items = run.items.set_index("id")
    methods = _grid_methods(run, opts)
    out = []
    for s_i, (query_set, frame) in enumerate(run.results.groupby("query_set", sort=False)):
        props = query_set.split("+")
        # the i-th query of a query set is the i-th row of every method (an item may be queried
        # twice with different conditions, so the query id alone does not name a query)
        per_method = {m: g.reset_index(drop=True) for m, g in frame.groupby("method", sort=False)}
        shown = [m for m in methods if m in per_method]
        if not shown:
            continue
        n = len(per_method[shown[0]])
        rng = np.random.default_rng([opts.seed, 29, s_i])
        for i in sorted(rng.choice(n, size=min(opts.grid_queries, n), replace=False)):
            first = per_method[shown[0]].iloc[i]
            query, conditions = str(first["query_id"]), figures.conditions_of(first)
            rows = [(m, [str(x) for x in per_method[m].iloc[i]["ranked_ids"]]) for m in shown]

            def labels_of(item: str, props=props) -> dict[str, str]:
                return {p: str(items.loc[item, p]) for p in props}

            data = figures.retrieval_grid(query, conditions, rows, image_of, labels_of)
            out.append(Figure(f"grid_{query_set}_{i:03d}_{query}.jpg",
                              f"{query_set}: query {query} with condition "
                              + ", ".join(f"{p} = {v}" for p, v in conditions.items())
                              + f"; top-{run.k} of each method (green frame: satisfies every condition).", data))
    return out, ""


def _per_class(run: RunFiles, opts: ReportOptions) -> tuple[list[Figure], list[str]]:
    metric = f"metric_precision_at_{run.k}"
    methods = [m for m in ("filtered_knn", _backward(0.0), _backward(run.lam), "student")
               if m in set(run.results["method"])]
    figs, sentences = [], []
    for query_set, frame in run.results.groupby("query_set", sort=False):
        props = query_set.split("+")
        frame = frame[frame["method"].isin(methods)]
        if frame.empty or metric not in frame:
            continue
        cond = frame["conditions"].map(lambda c: "/".join(json.loads(c)[p] for p in props))
        rows = []
        for (c, m), g in frame.assign(condition=cond).groupby(["condition", "method"], sort=False):
            e = bootstrap_ci(g[metric].to_numpy(dtype=float), opts.resamples, seed=opts.seed)
            rows.append({"condition": c, "method": m, "mean": e.mean, "low": e.low, "high": e.high, "n": e.n})
        table = pd.DataFrame(rows)
        lead = _backward(run.lam) if _backward(run.lam) in methods else methods[0]
        ranked = table[(table["method"] == lead) & (table["n"] >= MIN_RANKED_QUERIES)]
        worst = ranked.sort_values("mean").head(3)
        if worst.empty:
            sentences.append(f"{query_set}: no condition has {MIN_RANKED_QUERIES} queries or more; conditions are "
                             "not ranked (see the plot's intervals).")
        else:
            sentences.append(f"{query_set}: of the conditions with at least {MIN_RANKED_QUERIES} queries, the worst "
                             f"for {lead} are " + ", ".join(
                                 f"{r['condition']} ({cell(r['mean'], r['low'], r['high'])}, {r['n']} queries)"
                                 for _, r in worst.iterrows()) + ".")
        figs.append(Figure(f"per_class_{query_set}.png",
                           f"{query_set}: precision@{run.k} per condition with 95 % CIs"
                           + (" (the 16 worst for the first method)" if table["condition"].nunique() > 16 else ""),
                           figures.per_class_precision(table[table["method"].isin(methods)].assign(
                               method=pd.Categorical(table["method"], methods)).sort_values("method"),
                               f"precision@{run.k}")))
    return figs, sentences


def run_section(run: RunFiles, opts: ReportOptions) -> dict[str, Any]:
    k = run.k
    est = estimates(run, opts.resamples, opts.seed)
    sets = list(dict.fromkeys(run.results["query_set"]))
    precision = f"precision_at_{k}"
    section: dict[str, Any] = {"name": run.name, "path": str(run.path), "kind": "compare" if run.is_compare else "run",
                               "lam": run.lam, "provenance": _provenance(run), "tables": [], "figures": {},
                               "verdicts": [], "notes": []}
    table2 = methods_by_query_sets(est, precision)
    section["tables"].append(Table(
        f"Table 2 layout: precision@{k} (the paper's mAP@{k}) per query set, mean over queries [95 % bootstrap CI]",
        table2, "average: mean over the query sets; its interval averages the sets' bootstrap draws."))
    if run.is_compare:
        section["tables"].append(_table4(run, est))
    for qs in sets:
        section["tables"].append(Table(f"{qs}: every metric, mean [95 % CI] over {int(est[est['query_set'] == qs]['n'].max())} queries",
                                       metrics_of_query_set(est, qs, k),
                                       f"hit context@{k}: the context overlap of the retrieved items that satisfy the "
                                       "condition only (— where no method's result has a hit)."))
    for qs in sets:
        tables = domain_pairs(run, qs)
        if not tables:
            continue
        section["tables"].append(Table(
            f"{qs}: domain conversion, mAP over the whole database per source → target pair (correct = the "
            f"query's {run.manifest['dataset']['protocol']['class']} in the target domain; trapezoidal AP)",
            tables["pairs"], "average: over the pairs, each weighing the same; mean over the pair's queries, no "
            "interval (a pair holds a few queries: see the per-query table for intervals)."))
        for method in ("knn", "filtered_knn", _backward(run.lam), "student"):
            if f"matrix {method}" in tables:
                section["tables"].append(Table(f"{qs}, {method}: domain-conversion mAP, source (rows) → target "
                                               "(columns), with row and column averages", tables[f"matrix {method}"]))
    section["significance"] = _significance(run, precision, opts)
    timing = run.metrics[["query_set", "method", "ms_per_query"] + [c for c in ("mean_iterations", "satisfied_rate")
                                                                     if c in run.metrics]]
    section["timing"] = Table("Time per query (whole query set searched at once; one measurement, no interval)",
                              timing.pivot_table(index="method", columns="query_set", values="ms_per_query",
                                                 sort=False).reset_index())
    section["figures"]["cost"] = _cost_quality(run, est, k)
    # frontier
    y_axes = [(f"context_at_{k}", f"context@{k}"), (f"mts_at_{k}", f"mTS@{k}"), (f"hit_context_at_{k}", f"hit context@{k}"),
              (f"twin_hit_at_{k}", f"exact-target recall@{k}")]
    section["frontier"] = []
    for qs in sets:
        frames, sentences = [], []
        for y, title in y_axes:
            if est[est["metric"] == y].empty:
                continue
            f = frontier_points(run, est, qs, y)
            # how stable each membership is, and whether an off-frontier point is really beaten
            f["p_frontier"] = membership(run, f, qs, y, min(opts.resamples, 1000), opts.seed).to_numpy()
            frames.append((f, title))
            sentences.append(verdict(f, qs, title, f"precision@{k}",
                                     dominance(run, f, qs, y, opts.resamples, opts.seed)))
        flags = frames[0][0][["method", "x", "y"]].rename(columns={"x": f"precision@{k}", "y": frames[0][1]})
        for f, t in frames:
            flags[f"P(frontier), {t}"] = [("—" if np.isnan(p) else f"{p:.0%}") + (" ◯" if on else "")
                                          for p, on in zip(f["p_frontier"], f["pareto"])]
        section["frontier"].append({"query_set": qs, "sentences": sentences,
                                    "figure": Figure(f"frontier_{qs}.png", f"{qs}: precision@{k} against the context "
                                                     "metrics; bars: 95 % CIs; black rings: Pareto-optimal (oracle "
                                                     "excluded)", figures.frontier(frames, qs, f"precision@{k}")),
                                    "table": Table(f"{qs}: frontier membership: the share of {min(opts.resamples, 1000)} "
                                                   "paired bootstrap resamples of the queries in which the method is "
                                                   "Pareto-optimal (◯: on the frontier of the means; —: reference "
                                                   f"only, or a mean over fewer than {MIN_RANKED_QUERIES} queries)",
                                                   flags)})
    curves = _curve_points(run, est)
    if not curves.empty and curves["param"].nunique() > 1:
        section["figures"]["lambda"] = Figure("lambda_curves.png", f"Fig 6 layout: precision@{k}, mTS@{k} and "
                                              f"context@{k} against λ (Backward Search solid, student dashed; bands: "
                                              "95 % CIs)", figures.lambda_curves(curves, [
                                                  (precision, f"precision@{k}"), *y_axes[:2]]))
    if run.lambda_curve is not None and not run.lambda_curve.empty:
        solver_metrics = [(precision, f"precision@{k}"), (f"context_at_{k}", f"context@{k}")]
        points = solver_curve_estimates(run.lambda_curve, [m for m, _ in solver_metrics], opts.resamples, opts.seed)
        section["figures"]["solvers"] = Figure(
            "lambda_solvers.png", f"precision@{k} and context@{k} against λ: the run's Backward Search (preset, "
            "solid) and Eq 4 solved to its tolerance (converged, dashed); bands: 95 % CIs; hollow: λ = 0",
            figures.solver_curves(points, solver_metrics))
        section["solver_tables"] = []
        for qs in dict.fromkeys(run.lambda_curve["query_set"]):
            section["solver_tables"].append(Table(
                f"{qs}: the run's Backward Search (preset) beside Eq 4 solved to its tolerance (converged), per λ",
                solver_comparison(run.lambda_curve, qs, k), _SOLVER_NOTE))
    maps = []
    moving = [m for m in (_backward(run.lam), "student") if m in set(run.results["method"])]
    for qs in sets:
        data = figures.embedding_map(run, qs, moving, opts.map_queries, opts.seed) if moving else None
        if data is not None:
            maps.append(Figure(f"map_{qs}.png", f"Fig 5 layout, {qs}: t-SNE of the database sample with {opts.map_queries} "
                               "queries moved by " + " and ".join(moving), data))
    if not maps:
        section["notes"].append("No map: the run has no map_points.parquet (runs before this report) or no method "
                                "that moves the query.")
    section["maps"] = maps
    grids, why = _grids(run, opts)
    section["grids"], section["grid_note"] = grids, why
    section["per_class"], section["per_class_sentences"] = _per_class(run, opts)
    it = run.results[run.results["method"].isin([_backward(0.0), _backward(run.lam)])]
    if "iterations" in it and it["iterations"].notna().any():
        section["figures"]["iterations"] = Figure(
            "iterations.png", "Iterations of Backward Search per query (λ = 0 and the run's λ)",
            figures.iterations(it[["query_set", "method", "iterations"]].dropna()))
    missing = (run.compare or {}).get("missing", [])
    section["missing"] = [f"{m['baseline']}: weights missing: {'; '.join(m['paths'])}" for m in missing]
    return section


def _table4(run: RunFiles, est: pd.DataFrame) -> Table:
    """The paper's Table 4 layout: the compared baselines (headline template T1) and the
    suite's own methods per query set, precision@k mean [CI], plus the rows without weights."""
    k = run.k
    table = methods_by_query_sets(est, f"precision_at_{k}")
    table = table[~table["method"].str.contains(r"\[T[2-9]\]", regex=True)]
    for m in (run.compare or {}).get("missing", []):
        table = pd.concat([table, pd.DataFrame([{"method": m["baseline"],
                                                 table.columns[1]: "weights missing: " + "; ".join(m["paths"])}])])
    return Table(f"Table 4 layout: composed-image-retrieval baselines (template T1), precision@{k} [95 % CI]",
                 table.reset_index(drop=True), "A baseline without weights is a row saying which file is missing, "
                 "never a number.")


# --------------------------------------------------------------------------- other inputs

def tune_section(path: Path, tidy: pd.DataFrame) -> dict[str, Any]:
    from cir_bench.report.tune_tables import _config_label

    tidy = tidy.assign(config=_config_label(tidy))
    tables, figs = [], []
    metrics = [m for m in ("precision_at_10", "mts_at_10", "context_at_10") if m in tidy]

    def with_ci(frame: pd.DataFrame, m: str) -> pd.Series:
        if f"{m}_ci_low" in frame:
            return pd.Series([cell(a, b, c) for a, b, c in zip(frame[m], frame[f"{m}_ci_low"], frame[f"{m}_ci_high"])],
                             index=frame.index)
        return frame[m].map(lambda v: f"{v:.3f} [CI not recorded]")

    cal = tidy[(tidy["kind"] == "calibrated")] if "kind" in tidy else pd.DataFrame()
    if not cal.empty:
        ok = cal[cal["cal_status"] != "unreachable"] if "cal_status" in cal else cal
        t = ok[["config", "query_set", "lam"] + (["seed"] if "seed" in ok else [])].copy()
        for m in metrics:
            t[m] = with_ci(ok, m)
        tables.append(Table("Table 3 layout: each configuration at its calibrated λ (test queries), mean [95 % CI]",
                            t.reset_index(drop=True)))
    sweep = tidy[tidy["kind"] == "sweep"] if "kind" in tidy else tidy
    if not sweep.empty:
        t = sweep[["config", "query_set", "lam"] + (["seed"] if "seed" in sweep else [])].copy()
        for m in metrics:
            t[m] = with_ci(sweep, m)
        tables.append(Table("λ sweep of every configuration, mean [95 % CI]", t.reset_index(drop=True)))
        figs.append(Figure("tune_lambda.png", "Tune sweep: metrics against λ per configuration",
                           figures.tune_lambda_curves(sweep, metrics)))
    return {"path": str(path), "tables": tables, "figures": figs}


def loadtest_section(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    frame = pd.DataFrame(data["stages"])
    if "via" in frame and frame["via"].nunique() > 1:  # POST and GET measured side by side
        frame["method"] = frame["method"] + " (" + frame["via"].str.upper() + ")"
    cols = [c for c in ("method", "mode", "concurrency", "rate", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "qps")
            if c in frame]
    figs = [Figure("loadtest.png", "Latency and throughput against concurrency (closed-loop stages)",
                   figures.loadtest_latency(frame))] if {"p50_ms", "qps", "concurrency"} <= set(frame) else []
    return {"path": str(path), "url": data.get("url"),
            "tables": [Table("HTTP latency per stage (percentiles over the stage's requests; served on loopback)",
                             frame[cols])], "figures": figs}


def benchmark_section(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    ms, speed = [], []
    for qs, d in data.get("query_sets", {}).items():
        ms.append({"query_set": qs, **{f"{k} (ms/query)": v for k, v in d.get("ms_per_query", {}).items()},
                   "queries": d.get("n_queries")})
        speed.append({"query_set": qs, **{k: v for k, v in d.items() if k.startswith(("speedup", "identical", "retrieved"))}})
    context = {k: v for k, v in data.items() if k != "query_sets" and not isinstance(v, (dict, list))}
    tables = [Table("Table 5 layout: milliseconds per query", pd.DataFrame(ms)),
              Table("Table 6 layout: speed-ups and agreement, measured side by side in one run", pd.DataFrame(speed))]
    ways = side_by_side_rows(data)
    if ways:
        tables.append(Table("Backward Search run two ways, side by side in one run (engines: the eager loop "
                            "against the fixed-shape or graph-captured one; gradients: autograd against by hand)",
                            pd.DataFrame(ways)))
    return {"path": str(path), "context": context, "tables": tables}


def side_by_side_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per query set, comparison and variant of the benchmark's ``engines`` and
    ``gradients`` sections: ms at each batch size, capture time, and against the first
    variant the speed-up and the fraction of identical top-10 lists."""
    rows = []
    for qs, d in data.get("query_sets", {}).items():
        for what in ("engines", "gradients"):
            sec = d.get(what)
            if not isinstance(sec, dict) or "sizes" not in sec:
                continue
            labels = [k for k, v in sec.items() if isinstance(v, dict) and any(str(x).endswith("_ms") for x in v)]
            for i, label in enumerate(labels):
                row = {"query_set": qs, "comparison": what, "variant": label,
                       **{k: v for k, v in sec[label].items() if k.endswith("_ms")},
                       "capture_s": sec[label].get("capture_s")}
                if i:
                    key = "" if len(labels) == 2 else f"_{label}"
                    row.update({f"speedup_{k}": v for k, v in sec.get("speedup" + key, {}).items()})
                    row["identical_top10"] = sec.get("identical_top10" + key)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- writing

def write_html_report(inputs: ReportInputs, out: Path, opts: ReportOptions | None = None) -> list[Path]:
    """report.html and report.md (figures in report_figures/) in ``out``."""
    import jinja2

    opts = opts or ReportOptions()
    runs = [run_section(r, opts) for r in inputs.runs]
    pooled = []
    for group in seed_groups(inputs.runs):
        k = group[0].k
        pooled.append(Table(f"Pooled over seeds {sorted(r.manifest.get('seed') for r in group)}: precision@{k}, "
                            "mean ± std (n − 1) of the per-seed means", pooled_over_seeds(group, f"precision_at_{k}"),
                            "runs: " + ", ".join(str(r.path) for r in group)))
        reference = _backward(group[0].lam)
        diffs = pooled_differences(group, f"precision_at_{k}", reference, opts.resamples, opts.seed)
        if not diffs.empty:
            pooled.append(Table(
                f"Pooled over seeds: precision@{k} minus {reference}'s, per query set", pd.DataFrame({
                    "query set": diffs["query_set"], "method": diffs["method"],
                    "Δ (mean over seeds)": [f"{v:+.3f}" for v in diffs["delta"]],
                    "query 95 % CI": [f"[{a:+.3f}, {b:+.3f}]" for a, b in zip(diffs["query_low"], diffs["query_high"])],
                    "seed 95 % CI": [f"[{a:+.3f}, {b:+.3f}]" for a, b in zip(diffs["seed_low"], diffs["seed_high"])],
                    "per seed": [", ".join(f"{v:+.3f}" for v in p) for p in diffs["per_seed"]],
                    "": ["✱" if v else "" for v in diffs["significant"]]}),
                "query 95 % CI: paired bootstrap over the queries (the same queries in every seed) of the difference "
                "averaged over seeds; seed 95 % CI: t interval over the per-seed differences (each seed trains "
                "its own model and students); ✱ only where both intervals exclude 0."))
    context = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": runs, "pooled": pooled,
               "tunes": [tune_section(p, t) for p, t in inputs.tunes],
               "loadtests": [loadtest_section(p, d) for p, d in inputs.loadtests],
               "benchmarks": [benchmark_section(p, d) for p, d in inputs.benchmarks],
               "opts": opts, "inputs": [str(r.path) for r in inputs.runs] + [str(p) for p, _ in inputs.tunes]
               + [str(p) for p, _ in inputs.loadtests] + [str(p) for p, _ in inputs.benchmarks]}
    loader = jinja2.PackageLoader("cir_bench.report", "templates")
    options = {"trim_blocks": True, "lstrip_blocks": True, "undefined": jinja2.StrictUndefined}
    # every value from data is escaped: labels, ids and property names are whatever a CSV held
    envs = {"report.html.j2": jinja2.Environment(loader=loader, autoescape=True, **options),
            "report.md.j2": jinja2.Environment(loader=loader, autoescape=True, finalize=markdown_text, **options)}
    envs["report.md.j2"].filters["code_block"] = markdown_code_block
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "report_figures"
    fig_dir.mkdir(exist_ok=True)
    for old in [*fig_dir.glob("*.png"), *fig_dir.glob("*.jpg")]:  # a previous report's figures
        old.unlink()
    for fig in _all_figures(context):
        with atomic_write(fig_dir / fig.name) as tmp:
            tmp.write_bytes(fig.data)
    paths = [out / "report.html", out / "report.md"]
    for path, template in zip(paths, ("report.html.j2", "report.md.j2")):
        with atomic_write(path) as tmp:
            tmp.write_text(envs[template].get_template(template).render(**context), encoding="utf-8")
    return paths


def markdown_text(value: Any) -> Any:
    r"""A value from data as inert Markdown text: backslash, backtick, table pipe, link and image
    brackets and line breaks escaped (HTML's <, >, & and quotes are escaped after this, as
    entities); template output (``Markup``) passes as it is.

    >>> print(markdown_text("a|b](javascript:x) `c`"))
    a\|b]\(javascript:x) \`c\`
    """
    from markupsafe import Markup

    if isinstance(value, Markup) or value is None:
        return value
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # quotes are plain text here
    text = text.replace("\\", "\\\\").replace("`", "\\`").replace("|", "\\|")
    return Markup(text.replace("](", "]\\(").replace("][", "]\\[").replace("\r", " ").replace("\n", " "))


def markdown_code_block(text: Any, language: str = "") -> Any:
    """``text`` verbatim in a fenced code block whose fence is longer than any run of
    backticks inside it (nothing in a code block is read as Markdown or HTML)."""
    import re

    from markupsafe import Markup

    text = str(text)
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return Markup(f"{fence}{language}\n{text}{'' if text.endswith(chr(10)) else chr(10)}{fence}")


def _all_figures(context: dict[str, Any]) -> list[Figure]:
    figs: list[Figure] = []
    for i, run in enumerate(context["runs"]):
        prefix = f"run{i}_"
        run_figs = [*run["figures"].values(), *run["maps"], *run["grids"], *run["per_class"],
                    *(f["figure"] for f in run["frontier"])]
        for f in run_figs:
            f.name = prefix + f.name if not f.name.startswith(prefix) else f.name
        figs += run_figs
    for kind in ("tunes", "loadtests"):
        for i, sec in enumerate(context[kind]):
            for f in sec.get("figures", []):
                f.name = f"{kind}{i}_{f.name}" if not f.name.startswith(kind) else f.name
                figs.append(f)
    return figs
