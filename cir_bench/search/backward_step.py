"""Backward Search, floor 1 of 3: its settings, presets and the one masked step.

Every engine (search/backward_engines.py) runs ``masked_step`` on a state of rows (z0,
cond, z, Adam moments, step count, active mask, best iterate, patience counter) and reads
the answer with ``finish``; the method (search/backward.py) picks the engine.

Presets:
- ``paper``: L1 summed over dimensions (Eq 4's norm), CE weights 1, Adam lr 0.2, at most
  100 steps, early stopping on the per-query loss (patience 10) returning the best iterate.
  The paper says "until the model phi accurately produces the conditioning label" and
  "early stopping"; stopping at the first step whose argmax equals the condition
  (``stopping="satisfied"``, offered) leaves z on the decision boundary, which retrieves
  far worse than the loss plateau (docs/deviations.md, D2).
- ``authors-code``: the public code's batched ``InverseMapping.batch_compute``
  (docs/deviations.md, D1 and D3): L1 *mean* over dimensions, CE averaged over conditions,
  total loss monitored, the vector saved is the post-step one of the best pre-step loss, a
  query freezes after 11 non-improving steps. Published λ values mean the same thing here.
- ``converged``: Eq 4 to a stated tolerance by proximal gradient (search/proximal.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, get_args

import torch
import torch.nn.functional as F

from cir_bench.config import BackwardPreset, Optimizer, Reduction, Regularizer, StoppingRule
from cir_bench.data.base import UnknownLabelError
from cir_bench.search.objective import regulariser

STOPPING_RULES: tuple[str, ...] = get_args(StoppingRule)
# the rules that freeze a query before max_iter (authors-code runs every step, as the code does)
FREEZING_RULES = ("satisfied", "plateau", "plateau-ce")
# bumped when the same settings give other vectors (2: torch.optim.Adam's arithmetic), so
# caches keyed on a teacher (distilled students) are rebuilt; the gradient by hand gives
# autograd's bits on the CPU and did not bump it
IMPLEMENTATION_VERSION = 2
CONVERGED_ONLY = ("tol", "budget_confidence")  # settings only the converged solver reads
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True)
class BackwardSearchConfig:
    """What Backward Search computes (its λ included); how it runs is the method's."""

    lam: float = 1.0
    regularizer: Regularizer = "l1"  # squared for l2
    reduction: Reduction = "sum"  # over embedding dimensions
    optimizer: Optimizer = "adam"  # proximal: Eq 4 to a tolerance (search/proximal.py)
    lr: float = 0.2
    max_iter: int = 100
    condition_weights: Mapping[str, float] = field(default_factory=dict)  # w_m, default 1
    average_conditions: bool = False  # True: CE averaged over conditions (authors' code)
    stopping: StoppingRule = "satisfied"
    # "satisfied" also asks softmax(phi_m(z))[c_m] >= confidence for every condition; 0 =
    # argmax alone, which stops right on the decision boundary
    confidence: float = 0.0
    patience: int = 10
    min_delta: float = 0.0
    batch_size: int = 1024  # queries per chunk: bounds memory
    # converged: stop when the gradient mapping of the accepted step is at most tol
    tol: float = 1e-5
    # converged at λ = 0 (no minimiser): stop when every p(c_m | z) reaches this
    budget_confidence: float = 0.99

    def __post_init__(self) -> None:
        for name, literal in (("regularizer", Regularizer), ("reduction", Reduction), ("optimizer", Optimizer),
                              ("stopping", StoppingRule)):
            if getattr(self, name) not in get_args(literal):
                raise ValueError(f"{name} must be one of {get_args(literal)}, got '{getattr(self, name)}'")
        if (self.optimizer == "proximal") != (self.stopping == "converged"):
            raise ValueError("the proximal optimiser and stopping 'converged' go together (preset 'converged'); "
                             f"got optimizer '{self.optimizer}' with stopping '{self.stopping}'")
        if not (self.tol > 0 and 0.0 < self.budget_confidence < 1.0):
            raise ValueError(f"tol must be > 0 and budget_confidence in (0, 1), got {self.tol}, "
                             f"{self.budget_confidence}")
        if self.lam < 0 or self.max_iter < 0 or self.lr <= 0:
            raise ValueError("lam and max_iter must be >= 0 and lr > 0")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")

    @property
    def freezes(self) -> bool:
        """Whether a query can stop before max_iter (the loop may then end early)."""
        return self.stopping in FREEZING_RULES


PRESETS: dict[BackwardPreset, BackwardSearchConfig] = {
    "paper": BackwardSearchConfig(stopping="plateau"),
    "authors-code": BackwardSearchConfig(reduction="mean", average_conditions=True, stopping="authors-code",
                                         patience=10),
    # Eq 4 to a stated tolerance (search/proximal.py): the paper's objective (sum-L1, weights 1)
    "converged": BackwardSearchConfig(optimizer="proximal", stopping="converged", max_iter=3000),
}
assert set(PRESETS) == set(get_args(BackwardPreset))


@dataclass
class InversionResult:
    z: torch.Tensor  # (B, d) final embeddings
    iterations: torch.Tensor  # (B,) steps applied to each query
    satisfied: torch.Tensor  # (B,) bool: every conditioned head's argmax equals its condition
    objective: torch.Tensor  # (B,) Eq 4 (the config's objective) at z
    stop: list[str] | None = None  # the converged solver: why each query stopped (proximal.STOP_REASONS)
    stationarity: torch.Tensor | None = None  # the converged solver: (B,) its last gradient-mapping norm

    def rows(self, sl: slice) -> "InversionResult":
        return InversionResult(self.z[sl], self.iterations[sl], self.satisfied[sl], self.objective[sl],
                               None if self.stop is None else self.stop[sl],
                               None if self.stationarity is None else self.stationarity[sl])


def joined(parts: Sequence[InversionResult]) -> InversionResult:
    """The results of consecutive chunks as one."""
    stops, measures = [p.stop for p in parts], [p.stationarity for p in parts]
    return InversionResult(torch.cat([p.z for p in parts]), torch.cat([p.iterations for p in parts]),
                           torch.cat([p.satisfied for p in parts]), torch.cat([p.objective for p in parts]),
                           None if any(s is None for s in stops) else [r for s in stops for r in s],
                           None if any(m is None for m in measures) else torch.cat(measures))


def initial_state(z0: torch.Tensor, conditions: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state ``masked_step`` reads and writes, every row active at step 0."""
    z0 = z0.detach().float()
    n, dev = z0.shape[0], z0.device
    return {"z0": z0, "cond": conditions, "z": z0.clone(), "m1": torch.zeros_like(z0), "m2": torch.zeros_like(z0),
            "steps": torch.zeros(n, device=dev), "active": torch.ones(n, dtype=torch.bool, device=dev),
            "best_loss": torch.full((n,), float("inf"), device=dev), "best_z": z0.clone(),
            "counter": torch.zeros(n, device=dev)}


def adam_table(cfg: BackwardSearchConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's step size lr / (1 - b1^t) and sqrt(1 - b2^t) for t = 0 .. max_iter + 1 (t = 0
    read as 1), computed in float64 as torch.optim.Adam does with Python floats (1 - 0.999^t
    in float32 is off by ~1e-5 relative) and cast once: one gather per step, not ten ops."""
    b1, b2 = ADAM_BETAS
    t = torch.arange(cfg.max_iter + 2, dtype=torch.float64).clamp(min=1)
    step_size = (cfg.lr / (1 - b1 ** t)).float()
    bc2_sqrt = (1 - b2 ** t).sqrt().float()
    return step_size.to(device), bc2_sqrt.to(device)


def masked_step(cfg: BackwardSearchConfig, objective, w: Mapping[str, torch.Tensor],
                adam: tuple[torch.Tensor, torch.Tensor], lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One step of every row of the state ``w``, frozen rows kept as they are: the new state.
    Every engine (the eager loop, the fixed-shape loop and the CUDA graph or compiled code it
    makes) takes this step. ``adam``: ``adam_table``; ``lam``: λ as a tensor (a compiled
    step), else the config's. The element-wise Adam is torch.optim.Adam's arithmetic (which
    would keep moving a frozen row on its momentum)."""
    b1, b2 = ADAM_BETAS
    w = dict(w)
    z, active = w["z"], w["active"]
    loss_d, satisfied, grad = objective(z, w["z0"], w["cond"], grad=True,
                                        satisfied=cfg.stopping == "satisfied", lam=lam)
    if cfg.stopping == "satisfied":
        active = active & ~satisfied  # a satisfied query stops before stepping
    elif cfg.stopping in ("plateau", "plateau-ce"):
        watched = loss_d if cfg.stopping == "plateau" else loss_d - regulariser(z - w["z0"], cfg, lam)
        best = w["best_loss"] - cfg.min_delta if cfg.min_delta else w["best_loss"]
        upd = (watched < best) & active
        w["best_loss"] = torch.where(upd, watched, w["best_loss"])
        w["best_z"] = torch.where(upd[:, None], z, w["best_z"])
        w["counter"] = torch.where(upd, 0.0, w["counter"] + active.float())
        active = active & (w["counter"] < cfg.patience)
    w["active"] = active
    a = active[:, None]
    w["steps"] = w["steps"] + active.float()
    if cfg.optimizer == "adam":
        # moments by lerp / mul+addcmul, bias corrections from the float64 table, the step
        # lr/bc1 * m1 / (sqrt(m2)/sqrt(bc2) + eps) with a step size per row
        w["m1"] = torch.where(a, torch.lerp(w["m1"], grad, 1 - b1), w["m1"])
        w["m2"] = torch.where(a, torch.addcmul(w["m2"] * b2, grad, grad, value=1 - b2), w["m2"])
        t = w["steps"].long()[:, None]
        step_size, bc2_sqrt = adam[0][t], adam[1][t]
        step = (-step_size * w["m1"]) / (w["m2"].sqrt() / bc2_sqrt + ADAM_EPS)
    else:
        step = -cfg.lr * grad
    z_new = torch.where(a, z + step, z).detach()
    if cfg.stopping == "authors-code":
        # loss measured before the step, vector saved after it (docs/deviations.md, D3)
        improved = (loss_d <= w["best_loss"]) & (w["counter"] <= cfg.patience) & active
        w["best_loss"] = torch.where(improved, loss_d, w["best_loss"])
        w["best_z"] = torch.where(improved[:, None], z_new, w["best_z"])
        w["counter"] = torch.where(improved, torch.zeros_like(w["counter"]), w["counter"] + 1)
    w["z"] = z_new
    return w


def finish(cfg: BackwardSearchConfig, objective, heads: Mapping[str, torch.nn.Module],
           state: Mapping[str, torch.Tensor], properties: Sequence[str]) -> InversionResult:
    """The returned vector of each row (per stopping rule), its step count, whether it
    satisfies every condition (by the heads themselves: what the model predicts) and Eq 4 there."""
    z, z0, conditions = state["z"], state["z0"], state["cond"]
    steps, best_z, best_loss = state["steps"], state["best_z"], state["best_loss"]
    final = z
    if cfg.stopping in ("plateau", "plateau-ce"):
        # the best iterate seen; the current one if it was never beaten (the loss the loop
        # compared, from the same objective)
        cur_loss, _, _ = objective(z, z0, conditions, satisfied=False)
        if cfg.stopping == "plateau-ce":
            cur_loss = cur_loss - regulariser(z - z0, cfg)
        final = torch.where((cur_loss < best_loss)[:, None], z, best_z)
    elif cfg.stopping == "authors-code":
        final = torch.where(torch.isfinite(best_loss)[:, None], best_z, z)
        steps = torch.full_like(steps, float(cfg.max_iter))  # the code never breaks
    sat = satisfied_by_heads(heads, final, properties, conditions, cfg.confidence)
    with torch.no_grad():
        value, _, _ = objective(final, z0, conditions, satisfied=False)
    return InversionResult(final.detach(), steps.long(), sat, value.detach().double())


def satisfied_by_heads(heads: Mapping[str, torch.nn.Module], z: torch.Tensor, properties: Sequence[str],
                       conditions: torch.Tensor, confidence: float) -> torch.Tensor:
    """Whether each row's every head predicts its condition (with p >= confidence when > 0)."""
    with torch.no_grad():
        sat = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        for m, prop in enumerate(properties):
            logits = heads[prop](z)
            sat &= logits.argmax(dim=1) == conditions[:, m]
            if confidence > 0:
                sat &= torch.exp(-F.cross_entropy(logits, conditions[:, m], reduction="none")) >= confidence
    return sat


def head_sizes(heads: Mapping[str, torch.nn.Module], properties: Sequence[str]) -> tuple[int, list[int]]:
    """The embedding size the heads read and each property's number of classes."""
    def linears(head: torch.nn.Module) -> list[torch.nn.Linear]:
        return [m for m in head.modules() if isinstance(m, torch.nn.Linear)]

    first = linears(next(iter(heads.values())))
    return first[0].in_features, [linears(heads[p])[-1].out_features for p in properties]


def validate_inputs(heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
                    conditions: torch.Tensor) -> None:
    """A clear error for a batch the heads cannot search: unknown property, wrong shapes, a
    class id out of range."""
    if not properties:
        raise ValueError("Backward Search needs at least one condition")
    for prop in properties:
        if prop not in heads:
            raise UnknownLabelError(f"unknown property '{prop}'; the model has heads for: {', '.join(heads)}")
    if z0.dim() != 2:
        raise ValueError(f"query embeddings must be (batch, dim), got shape {tuple(z0.shape)}")
    d, classes = head_sizes(heads, properties)
    if z0.shape[1] != d:
        raise ValueError(f"query embeddings have size {z0.shape[1]}, the heads expect {d}")
    if conditions.shape != (z0.shape[0], len(properties)):
        raise ValueError(f"conditions must be (batch, {len(properties)}), got {tuple(conditions.shape)}")
    for m, (prop, n) in enumerate(zip(properties, classes)):
        bad = (conditions[:, m] < 0) | (conditions[:, m] >= n)
        if bool(bad.any()):
            raise UnknownLabelError(f"condition class id out of range for '{prop}' (0..{n - 1})")
