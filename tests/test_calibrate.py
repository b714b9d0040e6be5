"""λ calibration on synthetic monotone curves."""
from __future__ import annotations

import math

import pytest

from cir_bench.tune.calibrate import calibrate


def sigmoid_log(lam: float, scale: float = 1.0) -> float:
    return 0.05 + 0.25 / (1 + math.exp(-scale * math.log(lam)))  # increasing, 0.05..0.30


@pytest.mark.parametrize("target", [0.06, 0.15, 0.2, 0.29])
def test_hits_target_in_few_evaluations(target):
    r = calibrate(sigmoid_log, target, tolerance=0.005)
    assert r.status == "ok" and abs(r.value - target) <= 0.005
    assert abs(sigmoid_log(r.lam) - target) <= 0.005
    assert r.n_evaluations <= 8


def test_decreasing_metric_and_steep_curve():
    r = calibrate(lambda lam: 1 - sigmoid_log(lam, 4.0), 0.8, tolerance=0.002)  # precision falls with λ
    assert r.status == "ok" and abs(r.value - 0.8) <= 0.002 and r.n_evaluations <= 12


def test_unreachable_target_is_reported_not_guessed():
    r = calibrate(sigmoid_log, 0.5, tolerance=0.01)
    assert r.status == "unreachable" and r.lam is None and r.value is None
    assert "outside" in r.message and r.n_evaluations == 2


def test_budget_exhausted_returns_the_closest_and_says_so():
    r = calibrate(lambda lam: sigmoid_log(lam, 30.0), 0.175, tolerance=1e-9, max_evals=4)
    assert r.status == "max_evals" and r.n_evaluations == 4 and "closest" in r.message


def test_bad_arguments():
    with pytest.raises(ValueError, match="lam_min"):
        calibrate(sigmoid_log, 0.1, 0.01, lam_min=0)
