"""The precision–context frontier: which methods give the best trade-off between satisfying
the condition (precision@k) and keeping the query's context (context@k, mTS@k, or the
context of the hits only), as measured in a run.

A point is Pareto-optimal when no other point of the same query set is at least as good on
both axes and better on one. The oracle (ground-truth labels) is drawn as a reference but
takes no part: a user cannot run it.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from cir_bench.report.inputs import RunFiles
from cir_bench.report.stats import holm, paired_randomization_test
from cir_bench.report.tables import params_of

REFERENCE_ONLY = ("oracle_filtered_knn",)
#: a mean over fewer queries (hit context of a method with few hits, exact-target recall where
#: few queries have a twin) is drawn with its n but takes no part in a ranking or a frontier
MIN_RANKED_QUERIES = 30
CURVE_FAMILIES = {"backward": "lam", "student": "lam", "soft_filtered_knn": "beta"}
SYMBOL = {"lam": "λ", "beta": "β"}


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point has x' >= x and y' >= y with one of them strict (NaN: False).

    >>> pareto_mask(np.array([1.0, 0.5, 0.2]), np.array([0.1, 0.5, 0.4])).tolist()
    [True, True, False]
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    out = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (x >= x[i]) & (y >= y[i]) & ((x > x[i]) | (y > y[i]))
        out[i] = not others.any()
    return out


def points(run: RunFiles, est: pd.DataFrame, query_set: str, y_metric: str) -> pd.DataFrame:
    """One row per method of the query set: family (the registry name, or the baseline's),
    its swept parameter, precision and ``y_metric`` with their intervals, and ``pareto``."""
    k = run.k
    x_metric = f"precision_at_{k}"
    metrics = run.metrics[run.metrics["query_set"] == query_set]
    rows = []
    for _, m in metrics.iterrows():
        params = params_of(m)
        family = params.get("baseline") or m.get("name") or m["method"]
        key = CURVE_FAMILIES.get(family)
        param = params.get(key) if key else None
        if family == "student" and param is None:
            param = run.lam  # the default student imitates Backward Search at the run's λ
        if family == "backward" and param is None:
            param = run.lam
        row: dict[str, Any] = {"method": m["method"], "family": family, "param_name": key,
                               "param": np.nan if param is None else float(param)}
        for axis, metric in (("x", x_metric), ("y", y_metric)):
            e = est[(est["query_set"] == query_set) & (est["method"] == m["method"]) & (est["metric"] == metric)]
            if e.empty:
                row.update({axis: np.nan, f"{axis}_low": np.nan, f"{axis}_high": np.nan, f"{axis}_n": 0})
            else:
                e = e.iloc[0]
                row.update({axis: e["mean"], f"{axis}_low": e["low"], f"{axis}_high": e["high"],
                            f"{axis}_n": int(e["n"])})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["reference_only"] = frame["family"].isin(REFERENCE_ONLY)
    frame["too_few_queries"] = (frame["x_n"] < MIN_RANKED_QUERIES) | (frame["y_n"] < MIN_RANKED_QUERIES)
    frame["pareto"] = False
    live = ~frame["reference_only"] & ~frame["too_few_queries"]
    frame.loc[live, "pareto"] = pareto_mask(frame.loc[live, "x"].to_numpy(), frame.loc[live, "y"].to_numpy())
    return frame


def _name(row: pd.Series) -> str:
    if isinstance(row["param_name"], str) and not np.isnan(row["param"]):
        return f"{row['family']} {SYMBOL[row['param_name']]}={row['param']:g}"
    return str(row["method"])


def _params(rows: pd.DataFrame) -> str:
    values = sorted(rows["param"].dropna().unique())
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def verdict(frame: pd.DataFrame, query_set: str, y_title: str, x_title: str = "precision@10",
            dominated: pd.DataFrame | None = None) -> str:
    """One measured sentence: which methods are on the frontier and over which range, and
    where Backward Search stands. With ``frame["p_frontier"]`` (``membership``) it says how
    stable the frontier is; with ``dominated`` (``dominance``) a point off the frontier is
    called dominated only where the paired tests say so, else not separable."""
    few = frame[frame.get("too_few_queries", False) & ~frame["reference_only"] & frame["y"].notna()]
    live = _live(frame)
    front = live[live["pareto"]].sort_values("x", ascending=False)
    left_out = (f" ({len(few)} method(s) left out: {y_title} of fewer than {MIN_RANKED_QUERIES} queries, e.g. "
                f"{few.iloc[0]['method']} on {int(few.iloc[0]['y_n'])})") if len(few) else ""
    if front.empty:
        return f"{query_set}: no method has both {x_title} and {y_title} on {MIN_RANKED_QUERIES} queries or more."
    parts = []
    for family, g in front.groupby("family", sort=False):
        key = g["param_name"].iloc[0] if isinstance(g["param_name"].iloc[0], str) else None
        lo, hi = f"{g['x'].min():.3f}", f"{g['x'].max():.3f}"
        span = f"{x_title} {lo}" if lo == hi else f"{x_title} {lo}–{hi}"
        label = f"{family} at {SYMBOL[key]} ∈ {_params(g)}" if key else str(g["method"].iloc[0])
        parts.append(f"{label} ({span})")
    top, wide = front.iloc[0], front.sort_values("y", ascending=False).iloc[0]
    sentence = (f"{query_set}: of {len(live)} methods{left_out}, {len(front)} are on the {x_title}–{y_title} frontier, "
                f"from {_name(top)} ({top['x']:.3f}, {top['y']:.3f}) to {_name(wide)} ({wide['x']:.3f}, "
                f"{wide['y']:.3f}): " + "; ".join(parts))
    if "p_frontier" in live and live["p_frontier"].notna().any():
        stable = live[live["p_frontier"] >= 0.95]
        unstable = live[(live["p_frontier"] > 0.05) & (live["p_frontier"] < 0.95)]
        sentence += (f" (over paired bootstrap resamples of the queries: {len(stable)} method(s) on it in ≥ 95 % "
                     f"of them, {len(unstable)} in 5–95 %)")
    bs = live[live["family"] == "backward"]
    if len(bs) and dominated is not None:
        on = bs[bs["pareto"]]
        table = dominated.set_index("method") if len(dominated) else pd.DataFrame(columns=["dominated", "by", "p_holm"])
        off = bs[~bs["pareto"]]
        dom = off[off["method"].map(lambda m: bool(table["dominated"].get(m, False)))]
        sep = off[~off.index.isin(dom.index)]
        parts_bs = []
        if len(on):
            parts_bs.append(f"on it at λ ∈ {_params(on)}")
        if len(dom):
            first = table.loc[dom.iloc[0]["method"]]
            parts_bs.append(f"dominated at λ ∈ {_params(dom)} (e.g. λ={dom.iloc[0]['param']:g} by {first['by']}, "
                            f"paired tests on both axes, Holm p = {first['p_holm']:.3g})")
        if len(sep):
            parts_bs.append(f"off it but not separable from it at λ ∈ {_params(sep)} (no paired test significant "
                            "on both axes after Holm)")
        sentence += "; Backward Search is " + ", ".join(parts_bs)
    elif len(bs):
        on = bs[bs["pareto"]]
        if len(on) == len(bs):
            sentence += "; Backward Search is on it at every λ it was run with"
        elif len(on):
            sentence += f"; Backward Search is on it at λ ∈ {_params(on)} and dominated at λ ∈ {_params(bs[~bs['pareto']])}"
        else:
            worst = bs.sort_values("param").iloc[0]
            better = live[(live["x"] >= worst["x"]) & (live["y"] >= worst["y"]) & (live.index != worst.name)]
            best = better.sort_values(["x", "y"], ascending=False).iloc[0] if len(better) else None
            sentence += "; Backward Search is dominated at every λ" + (
                f" (e.g. λ={worst['param']:g} at ({worst['x']:.3f}, {worst['y']:.3f}) by {_name(best)} at "
                f"({best['x']:.3f}, {best['y']:.3f}))" if best is not None else "")
    return sentence + "."


def _live(frame: pd.DataFrame) -> pd.DataFrame:
    """The points that take part in the frontier: a method a user can run, with both means,
    each over enough queries."""
    live = frame[~frame["reference_only"] & frame["x"].notna() & frame["y"].notna()]
    return live[~live["too_few_queries"]] if "too_few_queries" in live else live


def _per_query(run: RunFiles, query_set: str, methods: list[str], metric: str) -> np.ndarray:
    """(M, Q) per-query values of ``metric`` for ``methods``, queries aligned by id (NaN where a
    method has no value for a query)."""
    frame = run.results[run.results["query_set"] == query_set]
    table = frame.pivot_table(index="query_id", columns="method", values=f"metric_{metric}", dropna=False,
                              aggfunc="first")
    return np.stack([table[m].to_numpy(dtype=float) if m in table else np.full(len(table), np.nan)
                     for m in methods])


def membership(run: RunFiles, frame: pd.DataFrame, query_set: str, y_metric: str, resamples: int = 1000,
               seed: int = 0) -> pd.Series:
    """P(on the frontier) of every live point of ``frame`` (``points``), by a paired bootstrap
    over queries: draw the queries with replacement B times (the same draw for every method),
    recompute each method's means of precision and ``y_metric`` (NaN-aware), and count how
    often the method is Pareto-optimal among the live points. Reference-only points and points
    over too few queries get NaN."""
    live = _live(frame)
    out = pd.Series(np.nan, index=frame["method"])
    if live.empty:
        return out
    methods = live["method"].tolist()
    x = _per_query(run, query_set, methods, f"precision_at_{run.k}")
    y = _per_query(run, query_set, methods, y_metric)
    rng = np.random.default_rng([seed, 83])
    draws = rng.integers(0, x.shape[1], size=(resamples, x.shape[1]))
    hits = np.zeros(len(methods))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw without any value: NaN
        for idx in draws:
            hits += pareto_mask(np.nanmean(x[:, idx], axis=1), np.nanmean(y[:, idx], axis=1))
    out.loc[methods] = hits / resamples
    return out


def dominance(run: RunFiles, frame: pd.DataFrame, query_set: str, y_metric: str, resamples: int = 2000,
              seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """For every live point off the frontier (means), the point that dominates it with the
    strongest evidence: paired randomisation tests on precision and on ``y_metric`` over the
    queries both have values for, p = max(p_x, p_y) (better on both axes: both tests must
    reject), the best dominator being the one with the smallest p; Holm over the points of the
    query set. ``dominated`` = adjusted p < alpha, else the point is *not separable* from the
    frontier. Columns: method, by, p, p_holm, dominated."""
    live = _live(frame)
    off = live[~live["pareto"]]
    if off.empty:
        return pd.DataFrame(columns=["method", "by", "p", "p_holm", "dominated"])
    methods = live["method"].tolist()
    x = _per_query(run, query_set, methods, f"precision_at_{run.k}")
    y = _per_query(run, query_set, methods, y_metric)
    rows = []
    for _, r in off.iterrows():
        i = methods.index(r["method"])
        best: tuple[float, str] | None = None
        for j, other in enumerate(methods):
            o = live.iloc[j]
            if j == i or not (o["x"] >= r["x"] and o["y"] >= r["y"] and (o["x"] > r["x"] or o["y"] > r["y"])):
                continue
            _, p_x = paired_randomization_test(x[j], x[i], resamples, seed)
            _, p_y = paired_randomization_test(y[j], y[i], resamples, seed)
            p = max(1.0 if np.isnan(p_x) else p_x, 1.0 if np.isnan(p_y) else p_y)
            if best is None or p < best[0]:
                best = (p, other)
        assert best is not None  # off the frontier: someone dominates it in means
        rows.append({"method": r["method"], "by": best[1], "p": best[0]})
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p"].to_numpy())
    table["dominated"] = table["p_holm"] < alpha
    return table
