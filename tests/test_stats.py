"""Uncertainty and significance: hand-checkable cases and independent references."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from cir_bench.report.stats import bootstrap_ci, holm, paired_randomization_test, significance_table


def test_identical_methods_are_not_different_and_a_constant_shift_is():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=200)
    assert paired_randomization_test(a, a) == (0.0, 1.0)
    diff, p = paired_randomization_test(a + 0.05, a)
    assert diff == pytest.approx(0.05) and p == pytest.approx(1 / 10001)  # no sign flip reaches it


def test_randomization_p_matches_full_enumeration():
    d = np.array([0.3, -0.1, 0.2, 0.25, -0.05, 0.1, 0.15, -0.2])
    observed = abs(d.mean())
    flips = np.array(list(itertools.product([-1, 1], repeat=len(d))))
    exact = float((np.abs((flips * d).mean(axis=1)) >= observed - 1e-12).mean())
    _, p = paired_randomization_test(d, np.zeros_like(d), resamples=20000)
    assert abs(p - exact) < 0.01


def test_bootstrap_ci_is_seeded_and_agrees_with_scipy():
    from scipy import stats

    x = np.random.default_rng(1).binomial(10, 0.3, size=200) / 10  # precision@10-like values
    a, b = bootstrap_ci(x, seed=3), bootstrap_ci(x, seed=3)
    assert a == b and a.low < a.mean < a.high and a.n == 200
    ref = stats.bootstrap((x,), np.mean, n_resamples=5000, method="percentile", random_state=0)
    assert a.low == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert a.high == pytest.approx(ref.confidence_interval.high, abs=0.006)
    wide, narrow = bootstrap_ci(x[:20]), bootstrap_ci(x)
    assert wide.high - wide.low > narrow.high - narrow.low


def test_holm_by_hand():
    assert holm([0.01, 0.02, 0.03, 0.5]).round(4).tolist() == [0.04, 0.06, 0.06, 0.5]
    assert np.isnan(holm([np.nan, 0.01])[0])


def test_significance_table_marks_only_real_differences():
    rng = np.random.default_rng(2)
    ref = rng.binomial(10, 0.5, size=100) / 10
    rows = []
    for method, values in (("backward[lam=0]", ref), ("same", ref.copy()), ("better", np.minimum(ref + 0.2, 1.0)),
                           ("noise", np.clip(ref + rng.normal(0, 0.01, size=100), 0, 1))):
        rows += [{"query_set": "style", "method": method, "query_id": f"q{i}", "metric_precision_at_10": v}
                 for i, v in enumerate(values)]
    table = significance_table(pd.DataFrame(rows), "precision_at_10", ["backward[lam=0]"], resamples=1000)
    by = table.set_index("method")
    assert not by.loc["same", "significant"] and by.loc["same", "p_value"] == 1.0
    assert by.loc["better", "significant"] and by.loc["better", "difference"] > 0.15
    assert by.loc["better", "ci_low"] <= by.loc["better", "mean"] <= by.loc["better", "ci_high"]
    assert pd.isna(by.loc["backward[lam=0]", "reference"])  # the reference itself: CI only
    with pytest.raises(ValueError, match="no per-query 'mts_at_10'"):
        significance_table(pd.DataFrame(rows), "mts_at_10", ["backward[lam=0]"])
