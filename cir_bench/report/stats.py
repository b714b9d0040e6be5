"""Uncertainty and significance over queries, computed from a run's per-query metrics.

- ``bootstrap_ci``: the mean over queries with a percentile bootstrap confidence interval:
  resample the n per-query values with replacement B times, take the mean each time, and
  report the (1-level)/2 and (1+level)/2 quantiles of those B means.
- ``paired_randomization_test``: two methods on the same queries; d_q = a_q - b_q. Under the
  null hypothesis that the two methods are exchangeable, each d_q's sign is a fair coin:
  p = (1 + #{flips: |mean(s * d)| >= |mean(d)|}) / (1 + B), two-sided, with B random sign
  vectors s (the randomisation test of trec_eval users and ranx's "fisher" test).
- ``holm``: Holm-Bonferroni adjusted p-values for m comparisons: sort p ascending,
  p'_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)).

All random draws are seeded; identical inputs give identical answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, level: float = 0.95,
                 seed: int | Sequence[int] = 0) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap interval (NaN values are left out).

    >>> e = bootstrap_ci([1.0] * 10)
    >>> (e.mean, e.low, e.high, e.n)
    (1.0, 1.0, 1.0, 10)
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = np.quantile(bootstrap_means(x, resamples, seed), [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size))


def bootstrap_means(values: Sequence[float], resamples: int = 2000, seed: int | Sequence[int] = 0) -> np.ndarray:
    """The ``resamples`` bootstrap means of ``values`` (NaN left out; all NaN when none is
    left). An interval over several query sets averages their draws, each set resampled
    with its own seed.

    >>> bootstrap_means([2.0, 2.0], resamples=3).tolist()
    [2.0, 2.0, 2.0]
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return np.full(resamples, np.nan)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 71])
    return x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap draws."""
    if np.isnan(draws).all():
        return float("nan"), float("nan")
    lo, hi = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_randomization_test(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean of a - b, two-sided p-value) over the queries both have a value for.

    >>> paired_randomization_test([0.5, 0.2, 0.9], [0.5, 0.2, 0.9])
    (0.0, 1.0)
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    observed = abs(d.mean())
    if observed == 0:
        return 0.0, 1.0
    rng = np.random.default_rng([seed, 73])
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, d.size))
    extreme = int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return float(d.mean()), (1 + extreme) / (1 + resamples)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (NaN stays NaN).

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def significance_table(results: pd.DataFrame, metric: str, references: Sequence[str], alpha: float = 0.05,
                       resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (query set, method): mean and 95 % bootstrap CI of ``metric`` over queries; per
    (query set, method, reference): the paired difference, its randomisation p-value and the
    Holm-adjusted p-value over all comparisons of that query set and reference, with
    ``significant`` = adjusted p < ``alpha``. ``results``: a run's results.parquet."""
    column = f"metric_{metric}"
    if column not in results.columns:
        raise ValueError(f"results have no per-query '{metric}' (columns metric_*: "
                         f"{sorted(c[7:] for c in results.columns if c.startswith('metric_'))})")
    rows = []
    for s_i, (query_set, frame) in enumerate(results.groupby("query_set", sort=False)):
        per_method = {m: g.set_index("query_id")[column] for m, g in frame.groupby("method", sort=False)}
        for method, values in per_method.items():
            # the seed of tables.estimates for this query set: one cell, one interval in every table
            est = bootstrap_ci(values.to_numpy(), resamples, seed=[seed, s_i])
            base = {"query_set": query_set, "method": method, "metric": metric, "mean": est.mean,
                    "ci_low": est.low, "ci_high": est.high, "n_queries": est.n}
            for ref in references:
                if ref not in per_method or ref == method:
                    continue
                a, b = values.align(per_method[ref], join="inner")
                diff, p = paired_randomization_test(a.to_numpy(), b.to_numpy(), resamples * 5, seed)
                rows.append({**base, "reference": ref, "difference": diff, "p_value": p})
            if not any(ref in per_method and ref != method for ref in references):
                rows.append({**base, "reference": None, "difference": np.nan, "p_value": np.nan})
    table = pd.DataFrame(rows)
    table["p_holm"] = np.nan
    for _, idx in table.groupby(["query_set", "reference"], dropna=True).groups.items():
        table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_value"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    return table


def run_significance(run_dir: Path, metric: str = "precision_at_10", resamples: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """``significance_table`` of a run directory against Backward Search at λ = 0 and at the
    run's λ (the methods named ``backward[...]`` in its results)."""
    results = pd.read_parquet(Path(run_dir) / "results.parquet")
    return significance_table(results, metric, backward_references(run_dir, results), resamples=resamples,
                              seed=seed)


def backward_references(run_dir: Path, results: pd.DataFrame) -> list[str]:
    """The Backward Search labels differences are tested against: λ = 0 and the run's λ
    (from its manifest), where the run has them."""
    import json

    manifest_path = Path(run_dir) / "manifest.json"
    lam = 0.005
    if manifest_path.is_file():
        lam = float(json.loads(manifest_path.read_text()).get("config", {}).get("search", {}).get("lam", lam))
    present = set(results["method"])
    return [r for r in dict.fromkeys([f"backward[lam={0.0:g}]", f"backward[lam={lam:g}]"]) if r in present]
