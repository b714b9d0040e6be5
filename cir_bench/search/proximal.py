"""Eq 4 solved to a stated tolerance: the ``converged`` solver of Backward Search.

    min_z  f(z) + g(z),   f(z) = sum_m w_m CE(phi_m(z), c_m) [/ M]  (+ lambda ||z - z0||^2 for l2),
                          g(z) = lambda * ||z - z0||_1  [/ d for a mean]

The L1 term is not differentiable where z_i = z0_i, which is exactly where a minimiser puts
most coordinates; Adam on the whole sum can only hover around those kinks. Proximal gradient
takes the gradient of the smooth part only and the L1 part by its proximal map (soft
thresholding towards z0), so coordinates come to rest at z0 exactly and the objective falls
at every accepted step. Each query has its own step size: a Barzilai–Borwein guess
(s·s / s·y of the smooth part), halved until the objective falls by at least
``SUFFICIENT_DECREASE / (2t) * |s|^2`` (a monotone line search; with heads that are not
convex this reaches a stationary point, not necessarily the global minimiser).

A query stops when the gradient mapping of the step just accepted, |s| / t with
s = prox(z - t grad f) - z (zero exactly at a stationary point), is at most ``tol``;
or, at lambda = 0 where Eq 4 has no minimiser (the CE only reaches 0 at infinity), when every
condition holds with p(c_m | z) >= ``budget_confidence``; or at ``max_iter``. The arithmetic is
float64 (the heads copied) so that the tolerance is not below float32's resolution of the
objective.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from cir_bench.search.objective import objective_for

SUFFICIENT_DECREASE = 1e-4  # Armijo-type constant of the line search
MAX_BACKTRACKS = 60  # halvings of one step before a query is called stalled
STEP_BOUNDS = (1e-12, 1e6)  # the Barzilai–Borwein guess is clipped to these
STEP_GROWTH = 4.0  # a step size grows at most this much from one step to the next
FIRST_MOVE = 0.2  # the first step moves the largest coordinate by this (Adam's lr 0.2 in the paper preset)

# why a query stopped (``stop`` of the result)
STOP_REASONS = ("stationary", "confident", "max_iter", "stalled")


@dataclass
class ProximalResult:
    z: torch.Tensor  # (B, d) float32
    iterations: torch.Tensor  # (B,) accepted steps
    objective: torch.Tensor  # (B,) Eq 4 at z (float64)
    stationarity: torch.Tensor  # (B,) the last gradient-mapping norm
    stop: list[str]  # (B,) one of STOP_REASONS


def solve_to_tolerance(heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
                       conditions: torch.Tensor, cfg: Any, lams: torch.Tensor | None = None,
                       analytic: bool = True) -> ProximalResult:
    """Minimise Eq 4 for every row of ``z0`` (cfg: a BackwardSearchConfig with ``tol``,
    ``max_iter``, ``budget_confidence``, ``lam``, ``regularizer``, ``reduction``, weights).
    ``lams``: one λ per row instead of the config's (a λ grid solved as one batch)."""
    heads64 = {p: copy.deepcopy(heads[p]).double().eval() for p in properties}
    l1 = cfg.regularizer == "l1"
    z0 = z0.detach().double()
    n, d = z0.shape
    lam = (torch.full((n,), float(cfg.lam), dtype=torch.float64) if lams is None
           else torch.as_tensor(lams, dtype=torch.float64).reshape(n)).to(z0.device)
    if bool((lam < 0).any()):
        raise ValueError("λ must be >= 0")
    # the regulariser's weight per coordinate; the CE alone is the objective's smooth part for
    # L1 (the squared L2 term is smooth and joins it); at λ = 0 the budget asks every
    # condition's probability to reach budget_confidence
    coef = lam if cfg.reduction == "sum" else lam / d
    zero = lam == 0
    smooth_ce = objective_for(heads64, properties, replace(cfg, lam=0.0, confidence=cfg.budget_confidence),
                              analytic=analytic)
    want_sat = bool(zero.any())
    cond = conditions

    def smooth(z, zz0, cc, cf):
        ce, sat, grad = smooth_ce(z, zz0, cc, grad=True, satisfied=want_sat)
        if not l1:
            diff = z - zz0
            ce = ce + cf * diff.pow(2).sum(dim=1)
            grad = grad + 2 * cf[:, None] * diff
        return ce, sat, grad

    def g(z, zz0, cf):
        return cf * (z - zz0).abs().sum(dim=1) if l1 else torch.zeros_like(cf)

    def prox(v, zz0, t, cf):
        if not l1:
            return v
        diff = v - zz0
        return zz0 + diff.sign() * (diff.abs() - (t * cf)[:, None]).clamp_min(0.0)

    z = z0.clone()
    f, sat, grad = smooth(z, z0, cond, coef)
    total = f + g(z, z0, coef)
    t = FIRST_MOVE / grad.abs().amax(dim=1).clamp_min(1e-12)
    steps = torch.zeros(n, dtype=torch.long, device=z.device)
    measure = torch.full((n,), float("inf"), dtype=torch.float64, device=z.device)
    stop = ["max_iter"] * n
    active = torch.ones(n, dtype=torch.bool, device=z.device)
    if want_sat:
        _freeze_rows(active, torch.arange(n, device=z.device), zero & sat, stop, "confident")

    for _ in range(cfg.max_iter):
        rows = active.nonzero().flatten()
        if rows.numel() == 0:
            break
        zr, z0r, cr, gr, tr, cfr = z[rows], z0[rows], cond[rows], grad[rows], t[rows], coef[rows]
        Fr = total[rows]
        new_z, new_f, new_grad = zr.clone(), f[rows].clone(), gr.clone()
        new_sat = torch.zeros(rows.numel(), dtype=torch.bool, device=z.device)
        accepted = torch.zeros(rows.numel(), dtype=torch.bool, device=z.device)
        for _ in range(MAX_BACKTRACKS):
            pend = (~accepted).nonzero().flatten()
            if pend.numel() == 0:
                break
            zt = prox(zr[pend] - tr[pend, None] * gr[pend], z0r[pend], tr[pend], cfr[pend])
            ft, st, gt = smooth(zt, z0r[pend], cr[pend], cfr[pend])
            step = zt - zr[pend]
            Ft = ft + g(zt, z0r[pend], cfr[pend])
            ok = Ft <= Fr[pend] - SUFFICIENT_DECREASE / (2 * tr[pend]) * (step * step).sum(dim=1)
            ok &= torch.isfinite(Ft)
            idx = pend[ok]
            new_z[idx], new_f[idx], new_grad[idx] = zt[ok], ft[ok], gt[ok]
            if st is not None:
                new_sat[idx] = st[ok]
            accepted[idx] = True
            tr = tr.clone()
            tr[pend[~ok]] *= 0.5
        # a query whose step would not lower the objective at any size has nothing left to
        # gain at this precision (or sits on a kink of a ReLU): it keeps its last iterate
        _freeze_rows(active, rows, ~accepted, stop, "stalled")
        if not bool(accepted.any()):
            continue
        ok_rows = rows[accepted]
        s_ = new_z[accepted] - zr[accepted]
        y = new_grad[accepted] - gr[accepted]
        used_t = tr[accepted]
        measure[ok_rows] = s_.norm(dim=1) / used_t
        z[ok_rows], f[ok_rows], grad[ok_rows] = new_z[accepted], new_f[accepted], new_grad[accepted]
        total[ok_rows] = f[ok_rows] + g(z[ok_rows], z0[ok_rows], coef[ok_rows])
        steps[ok_rows] += 1
        # the Barzilai–Borwein guess, grown by at most STEP_GROWTH per step: where the CE is
        # flat, s·y is tiny and the raw guess would cost dozens of halvings
        sy, ss = (s_ * y).sum(dim=1), (s_ * s_).sum(dim=1)
        bb = torch.where(sy > 0, ss / sy.clamp_min(1e-300), used_t * STEP_GROWTH)
        t[ok_rows] = torch.minimum(bb, used_t * STEP_GROWTH).clamp(*STEP_BOUNDS)
        zr_ = zero[ok_rows]
        _freeze_rows(active, ok_rows, zr_ & new_sat[accepted], stop, "confident")
        _freeze_rows(active, ok_rows, ~zr_ & (measure[ok_rows] <= cfg.tol), stop, "stationary")
    return ProximalResult(z.float(), steps, total, measure, stop)


def _freeze_rows(active: torch.Tensor, rows: torch.Tensor, done: torch.Tensor, stop: list[str], reason: str) -> None:
    hit = rows[done]
    for r in hit.tolist():
        stop[r] = reason
    active[hit] = False
