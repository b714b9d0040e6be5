"""λ calibration: find the λ at which a metric that is monotone in λ hits a target.

The paper compares backbones at equal tag similarity (λ adjusted until mTS@10 ≈ 0.15) but
did it by hand. ``calibrate`` does it with the Illinois variant of regula falsi on log λ
(bracketing, so it cannot diverge; the Illinois step avoids the one-sided stall of plain
false position), and says so when the target lies outside the range instead of returning
a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class CalibrationResult:
    status: str  # "ok" | "unreachable" | "max_evals"
    lam: float | None  # the calibrated λ (None when unreachable)
    value: float | None  # the metric at ``lam``
    target: float
    tolerance: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # (λ, metric) in call order
    message: str = ""

    @property
    def n_evaluations(self) -> int:
        return len(self.evaluations)


def calibrate(metric: Callable[[float], float], target: float, tolerance: float, lam_min: float = 1 / 16,
              lam_max: float = 64.0, max_evals: int = 12) -> CalibrationResult:
    """Find λ in [lam_min, lam_max] with |metric(λ) - target| <= tolerance.

    ``metric`` must be monotone in λ (either direction; the direction is read from the
    two ends). Each call may be expensive (a full search over a query set), so the
    evaluations are counted and returned.
    """
    if not 0 < lam_min < lam_max:
        raise ValueError(f"need 0 < lam_min < lam_max, got {lam_min}, {lam_max}")
    if tolerance <= 0 or max_evals < 2:
        raise ValueError("tolerance must be > 0 and max_evals >= 2")
    evals: list[tuple[float, float]] = []

    def f(lam: float) -> float:
        value = float(metric(lam))
        evals.append((lam, value))
        return value

    def done(lam: float, value: float, status: str = "ok", message: str = "") -> CalibrationResult:
        return CalibrationResult(status, lam, value, target, tolerance, evals, message)

    a, b = math.log(lam_min), math.log(lam_max)
    fa, fb = f(lam_min) - target, f(lam_max) - target
    if abs(fa) <= tolerance:
        return done(lam_min, fa + target)
    if abs(fb) <= tolerance:
        return done(lam_max, fb + target)
    if fa * fb > 0:
        lo_v, hi_v = sorted((fa + target, fb + target))
        return CalibrationResult(
            "unreachable", None, None, target, tolerance, evals,
            f"target {target} is outside [{lo_v:.4g}, {hi_v:.4g}], the metric's range for λ in "
            f"[{lam_min:g}, {lam_max:g}]")
    side = 0
    while len(evals) < max_evals:
        c = (a * fb - b * fa) / (fb - fa)  # false position on log λ
        lam = math.exp(c)
        fc = f(lam) - target
        if abs(fc) <= tolerance:
            return done(lam, fc + target)
        if fc * fb > 0:
            b, fb = c, fc
            if side == -1:
                fa /= 2  # Illinois: halve the stale end
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb /= 2
            side = 1
    best = min(evals, key=lambda e: abs(e[1] - target))
    return done(best[0], best[1], "max_evals",
                f"no λ within ±{tolerance} after {max_evals} evaluations; closest λ={best[0]:.4g}")
