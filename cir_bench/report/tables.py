"""Metric tables of the report: every cell a mean over queries with its 95 % bootstrap
interval, computed from the per-query values in results.parquet; seeds pooled as mean ± std.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cir_bench.report.inputs import RunFiles
from cir_bench.report.stats import bootstrap_means, interval

# (per-query column stem, title); {k} is the run's cutoff
TABLE_METRICS = [("precision_at_{k}", "precision@{k}"), ("mts_at_{k}", "mTS@{k}"),
                 ("context_at_{k}", "context@{k}"), ("hit_context_at_{k}", "hit context@{k}"),
                 ("twin_hit_at_{k}", "exact-target recall@{k}"),
                 ("ap_at_{k}_R", "AP@{k} (/R)"), ("recall_at_{k}", "recall@{k}"),
                 ("dc_map", "DC mAP"), ("dc_precision_at_{k}", "DC P@{k}")]


def metric_titles(k: int) -> list[tuple[str, str]]:
    return [(m.format(k=k), t.format(k=k)) for m, t in TABLE_METRICS]


def cell(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.884 [0.861, 0.905]``; an undefined mean (no query has a value) is ``—``."""
    if mean is None or np.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _bootstrap_cells(table: pd.DataFrame, by: list[str], metrics: Sequence[str], resamples: int,
                     seed: int) -> list[dict]:
    """One row per query set x group (``by``) x metric: the mean over the queries with a value,
    its bootstrap interval and draws, seeded per query set (every table of a run resamples a
    query set's queries alike)."""
    rows = []
    for s_i, (query_set, frame) in enumerate(table.groupby("query_set", sort=False)):
        for keys, g in frame.groupby(by, sort=False):
            for metric in metrics:
                col = f"metric_{metric}"
                if col not in g:
                    continue
                values = g[col].to_numpy(dtype=float)
                draws = bootstrap_means(values, resamples, seed=[seed, s_i])
                low, high = interval(draws)
                ok = ~np.isnan(values)
                rows.append({"query_set": query_set, **dict(zip(by, keys)), "metric": metric,
                             "mean": float(values[ok].mean()) if ok.any() else float("nan"),
                             "low": low, "high": high, "n": int(ok.sum()), "draws": draws})
    return rows


def estimates(run: RunFiles, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Long table: query_set, method, metric, mean, low, high, n (queries with a value), from
    results.parquet; plus the bootstrap draws for averaging over query sets (``draws``)."""
    order = list(dict.fromkeys(run.metrics["method"]))
    out = pd.DataFrame(_bootstrap_cells(run.results, ["method"], [m for m, _ in metric_titles(run.k)],
                                        resamples, seed))
    out["order"] = out["method"].map({m: i for i, m in enumerate(order)}).fillna(len(order))
    return out.sort_values(["order"], kind="stable").drop(columns="order").reset_index(drop=True)


def methods_by_query_sets(est: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The paper's Table 2 layout: rows = methods, columns = query sets + average; each cell
    mean [CI]. The average's interval averages the query sets' bootstrap draws."""
    sub = est[est["metric"] == metric]
    sets = list(dict.fromkeys(sub["query_set"]))
    rows = []
    for method, g in sub.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method}
        by_set = {r["query_set"]: r for _, r in g.iterrows()}
        for s in sets:
            r = by_set.get(s)
            row[s] = cell(r["mean"], r["low"], r["high"]) if r is not None else "—"
        if len(by_set) == len(sets) and len(sets) > 1:
            draws = np.mean([by_set[s]["draws"] for s in sets], axis=0)
            low, high = interval(draws)
            row["average"] = cell(float(np.mean([by_set[s]["mean"] for s in sets])), low, high)
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_of_query_set(est: pd.DataFrame, query_set: str, k: int) -> pd.DataFrame:
    """Rows = methods, columns = every metric of TABLE_METRICS, each mean [CI]; a metric
    defined on fewer queries than the set holds (exact-target recall: queries with a twin;
    hit context: queries with a hit) says on how many (``(n=…)``)."""
    sub = est[est["query_set"] == query_set]
    total = int(sub["n"].max()) if len(sub) else 0
    rows = []
    for method, g in sub.groupby("method", sort=False):
        by_metric = {r["metric"]: r for _, r in g.iterrows()}
        row = {"method": method}
        for metric, title in metric_titles(k):
            r = by_metric.get(metric)
            if r is not None:
                row[title] = cell(r["mean"], r["low"], r["high"]) + (
                    f" (n={int(r['n'])})" if int(r["n"]) < total and not np.isnan(r["mean"]) else "")
        rows.append(row)
    return pd.DataFrame(rows)


def seed_groups(runs: Sequence[RunFiles]) -> list[list[RunFiles]]:
    """Runs whose configs differ only in seed, output folder and cache folder: one group each."""
    groups: dict[str, list[RunFiles]] = {}
    for run in runs:
        if run.is_compare:
            continue
        cfg = {k: v for k, v in run.manifest.get("config", {}).items() if k not in ("seed", "out", "cache_dir")}
        groups.setdefault(json.dumps(cfg, sort_keys=True, default=str), []).append(run)
    return [g for g in groups.values() if len({r.manifest.get("seed") for r in g}) > 1]


def pooled_over_seeds(group: Sequence[RunFiles], metric: str) -> pd.DataFrame:
    """Rows = methods, columns = query sets: mean ± std (n − 1) over the seeds of each run's
    mean, from the runs' metrics.csv."""
    frames = []
    for run in group:
        m = run.metrics[["query_set", "method", metric]].copy() if metric in run.metrics else None
        if m is not None:
            m["seed"] = run.manifest.get("seed")
            frames.append(m)
    long = pd.concat(frames, ignore_index=True)
    stats = long.groupby(["method", "query_set"], sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    table = {}
    for _, r in stats.iterrows():
        std = 0.0 if np.isnan(r["std"]) else r["std"]
        table.setdefault(r["method"], {"method": r["method"]})[r["query_set"]] = (
            f"{r['mean']:.3f} ± {std:.3f} (n={int(r['count'])})")
    return pd.DataFrame(list(table.values()))


def params_of(row: pd.Series) -> dict[str, Any]:
    raw = row.get("params")
    try:
        return json.loads(raw) if isinstance(raw, str) and raw else {}
    except json.JSONDecodeError:
        return {}


def domain_pairs(run: RunFiles, query_set: str, metric: str = "dc_map") -> dict[str, pd.DataFrame]:
    """The domain-conversion tables of one query set that conditions on the domain, as that
    literature tabulates them: per method, the mean of ``metric`` over the queries of each
    (source domain → target domain) pair. Returns ``{"pairs": rows = methods, columns = the
    pairs + their average, "matrix <method>": rows = source, columns = target, with the row
    and column averages}``; every average is over pairs (each pair weighs the same). Empty
    when the run has no domain protocol or the set does not condition on the domain."""
    protocol = (run.manifest.get("dataset") or {}).get("protocol") or {}
    domain = protocol.get("domain")
    col = f"metric_{metric}"
    if not domain or domain not in query_set.split("+") or col not in run.results:
        return {}
    frame = run.results[run.results["query_set"] == query_set]
    source = frame["query_id"].map(run.items.set_index("id")[domain])
    frame = frame.assign(source=source.to_numpy(), target=frame[f"cond_{domain}"].to_numpy())
    means = frame.groupby(["method", "source", "target"], sort=False)[col].mean()
    domains = list((run.manifest.get("dataset") or {}).get("properties", {}).get(domain) or sorted(set(source)))
    pairs = [(a, b) for a in domains for b in domains if a != b and (a, b) in
             set(zip(frame["source"], frame["target"]))]
    wide = []
    out: dict[str, pd.DataFrame] = {}
    for method in dict.fromkeys(frame["method"]):
        values = {f"{a}→{b}": means.get((method, a, b), np.nan) for a, b in pairs}
        wide.append({"method": method, **{k: round(float(v), 4) for k, v in values.items()},
                     "average": round(float(np.nanmean(list(values.values()))), 4)})
        matrix = pd.DataFrame(np.nan, index=domains, columns=domains)
        for a, b in pairs:
            matrix.loc[a, b] = means.get((method, a, b), np.nan)
        matrix["average"] = matrix.mean(axis=1)
        matrix.loc["average"] = matrix[domains].mean(axis=0)
        matrix.loc["average", "average"] = float(np.nanmean([means.get((method, a, b), np.nan) for a, b in pairs]))
        out[f"matrix {method}"] = matrix.round(4).reset_index(names=f"{domain}: source \\ target")
    out = {"pairs": pd.DataFrame(wide), **out}
    return out


def cost_points(metrics: pd.DataFrame, est: pd.DataFrame, metric_names: Sequence[str]) -> pd.DataFrame:
    """Per query set, method and metric: ms per query (metrics.csv, one measurement) beside the
    metric's mean and 95 % interval (``estimates``); a template-dependent baseline by its T1 row,
    methods without a time left out."""
    timed = metrics[["query_set", "method", "ms_per_query"]].dropna()
    timed = timed[~timed["method"].str.contains(r"\[T[23]\]$", regex=True)]
    cells = est[est["metric"].isin(metric_names)][["query_set", "method", "metric", "mean", "low", "high"]]
    out = timed.merge(cells, on=["query_set", "method"])
    return out.rename(columns={"ms_per_query": "ms", "mean": "y", "low": "y_low", "high": "y_high"})


def solver_curve_estimates(curve: pd.DataFrame, metrics: Sequence[str], resamples: int = 2000,
                           seed: int = 0) -> pd.DataFrame:
    """lambda_curve.parquet as query_set, solver, param (λ), metric, mean, low, high, n: each
    a mean over queries with its bootstrap interval (the query sets' seeds as in ``estimates``)."""
    out = pd.DataFrame(_bootstrap_cells(curve, ["solver", "lam"], metrics, resamples, seed))
    if out.empty:
        return out
    out = out.rename(columns={"solver": "family", "lam": "param"}).drop(columns="draws")
    out["param"] = out["param"].astype(float)
    return out


def solver_comparison(curve: pd.DataFrame, query_set: str, k: int) -> pd.DataFrame:
    """Per λ: each solver's precision@k, context@k and mean objective; the converged solver's
    mean objective over the preset's; each solver's gap to the best found (the lower of the
    two objectives for each query): mean(F − best) / mean(best), none at λ = 0 where Eq 4 has
    no minimiser; and how the converged solver's queries stopped."""
    frame = curve[curve["query_set"] == query_set]
    key = "query_index" if "query_index" in frame else "query_id"
    frame = frame.assign(best=frame.groupby(["lam", key])["objective"].transform("min"))
    rows = []
    for lam, g in frame.groupby("lam", sort=True):
        row: dict[str, Any] = {"λ": f"{lam:g}"}
        by = {s: h for s, h in g.groupby("solver", sort=False)}
        for solver, h in by.items():
            for metric, title in ((f"precision_at_{k}", f"precision@{k}"), (f"context_at_{k}", f"context@{k}")):
                if f"metric_{metric}" in h:  # context needs tags: a dataset without them has none
                    row[f"{solver} {title}"] = f"{h[f'metric_{metric}'].mean():.3f}"
            row[f"{solver} objective"] = f"{h['objective'].mean():.4g}"
            row[f"{solver} gap to best"] = (f"{(h['objective'] - h['best']).mean() / h['best'].mean():.1%}"
                                            if lam > 0 else "—")
        if {"preset", "converged"} <= set(by):
            row["converged / preset objective"] = (
                f"{by['converged']['objective'].mean() / by['preset']['objective'].mean():.2f}" if lam > 0 else "—")
        if "converged" in by:
            counts = by["converged"]["stop"].value_counts()
            row["converged: stopped"] = ", ".join(f"{reason} {n}" for reason, n in counts.items())
        rows.append(row)
    return pd.DataFrame(rows)


SEED_T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def pooled_differences(group: Sequence[RunFiles], metric: str, reference: str, resamples: int = 2000,
                       seed: int = 0) -> pd.DataFrame:
    """Per query set and method: the difference to ``reference`` pooled over the seeds of
    ``group`` (runs on the same queries), with two intervals and a mark only where both
    exclude 0.

    - query interval: a paired bootstrap over the queries (the same resampled queries in every
      seed) of  Δ = mean_s mean_q (m_sq − r_sq);
    - seed interval: Δ ± t(0.975, S − 1) · sd_s(Δ_s) / √S over the S per-seed differences Δ_s
      (training noise: another seed trains another model and student).
    """
    col = f"metric_{metric}"
    rows = []
    sets = list(dict.fromkeys(group[0].results["query_set"]))
    for s_i, query_set in enumerate(sets):
        per_seed: dict[str, list[pd.Series]] = {}
        for run in group:
            frame = run.results[run.results["query_set"] == query_set]
            if col not in frame:
                continue
            wide = frame.pivot_table(index="query_id", columns="method", values=col, sort=False)
            if reference not in wide:
                continue
            for method in wide.columns:
                if method != reference:
                    per_seed.setdefault(method, []).append(wide[method] - wide[reference])
        for method, diffs in per_seed.items():
            if len(diffs) < 2:
                continue
            joined = pd.concat(diffs, axis=1, join="inner").dropna()  # queries present in every seed
            if joined.empty:
                continue
            d = joined.to_numpy(dtype=float)  # (queries, seeds)
            by_seed = d.mean(axis=0)
            delta = float(by_seed.mean())
            rng = np.random.default_rng([seed, s_i, 113])
            idx = rng.integers(0, d.shape[0], size=(resamples, d.shape[0]))
            draws = d.mean(axis=1)[idx].mean(axis=1)
            q_low, q_high = interval(draws)
            n_seeds = d.shape[1]
            half = SEED_T_975.get(n_seeds, 1.96) * float(by_seed.std(ddof=1)) / np.sqrt(n_seeds)
            s_low, s_high = delta - half, delta + half
            both = (q_low > 0 or q_high < 0) and (s_low > 0 or s_high < 0)
            rows.append({"query_set": query_set, "method": method, "delta": delta, "query_low": q_low,
                         "query_high": q_high, "seed_low": s_low, "seed_high": s_high, "per_seed": by_seed.tolist(),
                         "n_queries": d.shape[0], "n_seeds": n_seeds, "significant": bool(both)})
    return pd.DataFrame(rows)
