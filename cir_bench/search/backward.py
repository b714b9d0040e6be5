"""Backward Search (paper Eq 4, Algorithm 1): move the query embedding z, not the model.

    z* = argmin_z  sum_m w_m * CE(phi_m(z), c_m) + lambda * R(z - z0)

by gradient steps on z alone, the heads frozen in eval mode (BN running statistics, no
dropout), then retrieve the database items nearest to z*.

Batching changes nothing: the loss is a sum of per-query terms and the optimiser state
is per element, so every query follows the same trajectory it would follow alone. A
query whose stopping rule fires is frozen (its z, optimiser state and step count stop)
while the rest go on; the loop ends when all are frozen. The optimiser is written out
element-wise for that reason: ``torch.optim.Adam`` would keep moving a frozen row on its
momentum.

Presets:
- ``paper``: L1 summed over dimensions (Eq 4's norm), CE weights 1, Adam lr 0.2, at most
  100 steps, early stopping on the per-query loss (patience 10) returning the best iterate.
  The paper says "until the model phi accurately produces the conditioning label" and
  "early stopping"; stopping at the first step whose argmax equals the condition
  (``stopping="satisfied"``, offered) leaves z on the decision boundary: on SynthArt
  default it gave precision@10 0.59 against 0.88 for the loss plateau at lambda 0.
- ``authors-code``: the public code's batched ``InverseMapping.batch_compute``
  (docs/deviations.md, D1 and D3): L1 *mean* over dimensions, CE averaged over conditions, total
  loss monitored, the vector saved is the post-step one of the best pre-step loss, a query
  freezes after 11 non-improving steps. Published lambda values mean the same thing here.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cir_bench.data.base import UnknownLabelError
from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.search.objective import regulariser, objective_for, state_version
from cir_bench.search.proximal import solve_to_tolerance

# plateau: patience on the total loss (the paper preset); plateau-ce: on the CE alone (the
# L1 term grows while the CE vanishes, so the total stops early for any λ > 0); converged:
# the proximal solver's tolerance (search/proximal.py), with the proximal optimiser only
STOPPING_RULES = ("satisfied", "plateau", "plateau-ce", "none", "authors-code", "converged")
# eager: the loop that shrinks its batch as queries freeze (CPU default); fixed: one shape,
# masks, padded to a bucket; graph: fixed, each step a captured CUDA graph (CUDA default)
ENGINES = ("auto", "eager", "fixed", "graph")
# padded batch sizes of the fixed-shape loop (chunks of 4096); 16 and 32 for served request
# batches (up to batching.teacher.max_batch_size, 16): a batch of 12 on the compiled CPU step
# took 7.2 ms padded to 64 rows and 4.6 ms padded to 16 (2 cores)
BUCKETS = (1, 8, 16, 32, 64, 512, 4096)
# how the gradient is taken: auto = by hand through the heads where they are plain chains
# (search/objective.py), autograd otherwise
GRADIENTS = ("auto", "autograd")
# bumped when the same settings give other vectors (2: torch.optim.Adam's arithmetic), so
# caches keyed on a teacher (distilled students) are rebuilt; the gradient by hand gives
# autograd's bits on the CPU and did not bump it
IMPLEMENTATION_VERSION = 2
CONVERGED_ONLY = ("tol", "budget_confidence")  # settings only the converged solver reads
GRID_ROWS = 16384  # the converged solver over a λ grid: at most this many (query, λ) rows per batch


@dataclass(frozen=True)
class BackwardSearchConfig:
    lam: float = 1.0
    regularizer: str = "l1"  # l1 | l2 (squared)
    reduction: str = "sum"  # sum | mean over embedding dimensions
    optimizer: str = "adam"  # adam | sgd | proximal (Eq 4 to a tolerance: search/proximal.py)
    lr: float = 0.2
    max_iter: int = 100
    condition_weights: Mapping[str, float] = field(default_factory=dict)  # w_m, default 1
    average_conditions: bool = False  # True: CE averaged over conditions (authors' code)
    stopping: str = "satisfied"  # one of STOPPING_RULES
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
        if self.regularizer not in ("l1", "l2"):
            raise ValueError(f"regularizer must be l1 or l2, got '{self.regularizer}'")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be sum or mean, got '{self.reduction}'")
        if self.optimizer not in ("adam", "sgd", "proximal"):
            raise ValueError(f"optimizer must be adam, sgd or proximal, got '{self.optimizer}'")
        if (self.optimizer == "proximal") != (self.stopping == "converged"):
            raise ValueError("the proximal optimiser and stopping 'converged' go together (preset 'converged'); "
                             f"got optimizer '{self.optimizer}' with stopping '{self.stopping}'")
        if not (self.tol > 0 and 0.0 < self.budget_confidence < 1.0):
            raise ValueError(f"tol must be > 0 and budget_confidence in (0, 1), got {self.tol}, "
                             f"{self.budget_confidence}")
        if self.stopping not in STOPPING_RULES:
            raise ValueError(f"stopping must be one of {STOPPING_RULES}, got '{self.stopping}'")
        if self.lam < 0 or self.max_iter < 0 or self.lr <= 0:
            raise ValueError("lam and max_iter must be >= 0 and lr > 0")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")


PRESETS: dict[str, BackwardSearchConfig] = {
    "paper": BackwardSearchConfig(stopping="plateau"),
    "authors-code": BackwardSearchConfig(reduction="mean", average_conditions=True, stopping="authors-code",
                                         patience=10),
    # Eq 4 to a stated tolerance (search/proximal.py): the paper's objective (sum-L1, weights 1)
    "converged": BackwardSearchConfig(optimizer="proximal", stopping="converged", max_iter=3000),
}


@dataclass
class InversionResult:
    z: torch.Tensor  # (B, d) final embeddings
    iterations: torch.Tensor  # (B,) Adam steps applied to each query
    satisfied: torch.Tensor  # (B,) bool: every conditioned head's argmax equals its condition
    objective: torch.Tensor  # (B,) Eq 4 (the config's objective) at z
    stop: list[str] | None = None  # the converged solver: why each query stopped (proximal.STOP_REASONS)


class BackwardSearch(SearchMethod):
    """Registered as ``backward``; ``BackwardSearch(preset="authors-code", lam=1.1)``."""

    name = "backward"

    def __init__(self, preset: str = "paper", engine: str = "auto", check_every: int | None = None,
                 gradient: str = "auto", compile: bool = False, **overrides: Any) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown Backward Search preset '{preset}'; available: {', '.join(PRESETS)}")
        if engine not in ENGINES:
            raise ValueError(f"unknown Backward Search engine '{engine}'; available: {', '.join(ENGINES)}")
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown Backward Search gradient '{gradient}'; available: {', '.join(GRADIENTS)}")
        if check_every is not None and int(check_every) < 0:
            raise ValueError(f"check_every must be >= 0 (0: never, run to max_iter), got {check_every}")
        if compile and engine == "eager":
            raise ValueError("compile needs the fixed-shape loop (engine 'fixed', 'graph' or 'auto'); the eager "
                             "loop changes shape as queries freeze")
        self.preset = preset
        self.engine = engine  # how the loop runs, not what it computes: not in params()
        self.check_every = check_every
        self.gradient = gradient  # likewise: how, not what
        self.compile = bool(compile)  # the fixed-shape step through torch.compile: likewise
        self.config = replace(PRESETS[preset], **overrides)
        if self.config.optimizer == "proximal" and (compile or engine in ("fixed", "graph")):
            raise ValueError("the converged solver runs its own loop (search/proximal.py): engine 'fixed'/'graph' "
                             "and compile apply to the Adam presets")
        self.last_capture_s = 0.0  # seconds spent compiling / capturing CUDA graphs in the last invert()
        # with compile: per bucket used, whether the compiled step runs and what its check found
        self.compile_outcomes: dict[int, tuple[bool, str]] = {}

    def params(self) -> dict[str, Any]:
        """What the search computes (manifests, cache keys); the converged solver's settings
        only where it runs, so adding them left the Adam presets' keys as they were."""
        out = {"preset": self.preset, **asdict(self.config)}
        if self.config.optimizer != "proximal":
            for key in CONVERGED_ONLY:
                out.pop(key)
        return out

    @property
    def compiled(self) -> bool:
        """With compile: whether every bucket used so far runs the compiled (verified) step."""
        return self.compile and all(ok for ok, _ in self.compile_outcomes.values())

    def setup_info(self) -> dict[str, Any]:
        """With compile, per bucket used: compiled or fell back, and why (the manifest)."""
        if not self.compile:
            return {}
        return {"compile": {str(b): {"compiled": ok, "note": note}
                            for b, (ok, note) in sorted(self.compile_outcomes.items())}}

    # -- the inversion -----------------------------------------------------------------
    def invert(self, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
               conditions: torch.Tensor) -> InversionResult:
        """Run the search for a batch; ``conditions`` (B, M) class ids, column m = properties[m]."""
        cfg = self.config
        _validate(heads, z0, properties, conditions)
        self.last_capture_s = 0.0
        if cfg.optimizer == "proximal":
            return self._invert_converged(heads, z0, properties, conditions)
        engine = self.resolved_engine(z0.device)
        objective = objective_for(heads, properties, cfg, analytic=self.gradient == "auto")
        chunk = cfg.batch_size if engine == "eager" else BUCKETS[-1]
        parts = []
        for start in range(0, z0.shape[0], chunk):
            sl = slice(start, start + chunk)
            if engine == "eager":
                r = self._invert_chunk(objective, heads, z0[sl], properties, conditions[sl])
            else:
                r = self._invert_fixed(objective, heads, z0[sl], properties, conditions[sl],
                                       capture=engine == "graph")
            parts.append(r)
        return _joined(parts)

    def invert_grid(self, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
                    conditions: torch.Tensor, lams: Sequence[float]) -> list[InversionResult]:
        """``invert`` at every λ of ``lams`` (everything else as configured). The converged
        solver takes the whole grid as one batch, a λ per row: its loop's cost is per step,
        not per row."""
        lams = [float(v) for v in lams]
        if self.config.optimizer != "proximal":
            return [self.at_lambda(lam).invert(heads, z0, properties, conditions) for lam in lams]
        _validate(heads, z0, properties, conditions)
        n = z0.shape[0]
        rows_per_chunk = max(GRID_ROWS // max(n, 1), 1) * n  # whole λ blocks per chunk
        zz, cc = z0.repeat(len(lams), 1), conditions.repeat(len(lams), 1)
        ll = torch.tensor(lams, dtype=torch.float64).repeat_interleave(n)
        parts = []
        for start in range(0, zz.shape[0], rows_per_chunk):
            sl = slice(start, start + rows_per_chunk)
            parts.append(self._converged_part(heads, zz[sl], properties, cc[sl], ll[sl]))
        joined = _joined(parts)
        return [InversionResult(joined.z[i * n:(i + 1) * n], joined.iterations[i * n:(i + 1) * n],
                                joined.satisfied[i * n:(i + 1) * n], joined.objective[i * n:(i + 1) * n],
                                joined.stop[i * n:(i + 1) * n]) for i in range(len(lams))]

    def at_lambda(self, lam: float) -> "BackwardSearch":
        """The same search at another λ."""
        other = BackwardSearch(self.preset, engine=self.engine, check_every=self.check_every, gradient=self.gradient,
                               compile=self.compile)
        other.config = replace(self.config, lam=float(lam))
        return other

    def _converged_part(self, heads, z0, properties, conditions, lams=None) -> InversionResult:
        r = solve_to_tolerance(heads, z0, properties, conditions, self.config, lams=lams,
                               analytic=self.gradient == "auto")
        sat = _satisfied_by_heads(heads, r.z, properties, conditions, self.config.confidence)
        return InversionResult(r.z, r.iterations, sat, r.objective, r.stop)

    def _invert_converged(self, heads, z0, properties, conditions) -> InversionResult:
        """Eq 4 to the tolerance (search/proximal.py), in chunks of batch_size."""
        cfg = self.config
        parts = []
        for start in range(0, z0.shape[0], cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            parts.append(self._converged_part(heads, z0[sl], properties, conditions[sl]))
        return _joined(parts)

    def _invert_chunk(self, objective, heads, z0, properties, conditions) -> InversionResult:
        """The eager loop: the batch shrinks to its active rows as queries freeze."""
        cfg = self.config
        n = z0.shape[0]
        dev = z0.device
        z0 = z0.detach().float()
        # Full-size state; the loop works on the rows still active ("working set") and
        # writes them back when it shrinks the set, so frozen queries cost nothing.
        full = {
            "z0": z0, "cond": conditions, "z": z0.clone(), "m1": torch.zeros_like(z0), "m2": torch.zeros_like(z0),
            "steps": torch.zeros(n, device=dev), "active": torch.ones(n, dtype=torch.bool, device=dev),
            "best_loss": torch.full((n,), float("inf"), device=dev), "best_z": z0.clone(),
            "counter": torch.zeros(n, device=dev),
        }
        rows = torch.arange(n, device=dev)
        w = dict(full)  # working set = everything at first
        freezes = cfg.stopping in ("satisfied", "plateau", "plateau-ce")
        # Looking at the active mask reads a value back to the host; on CUDA do it every 10
        # steps only. Extra steps change nothing: frozen rows are not updated.
        check_every = 10 if dev.type == "cuda" else 1

        def write_back() -> None:
            for key, value in w.items():
                if key not in ("z0", "cond") and value is not full[key]:
                    full[key][rows] = value

        adam = _adam_table(cfg, dev)
        for it in range(cfg.max_iter):
            if freezes and it % check_every == 0:
                n_active = int(w["active"].sum())
                if n_active == 0:
                    break
                if n_active < 0.75 * rows.numel():  # shrink the working set
                    write_back()
                    keep = w["active"]
                    rows = rows[keep]
                    w = {key: value[keep] for key, value in w.items()}
            w.update(self._step(objective, w, adam))
        write_back()
        return self._finish(objective, heads, full, z0, properties, conditions)

    def resolved_engine(self, device: torch.device) -> str:
        """``auto``: the captured graph on CUDA, the eager loop elsewhere (on CPU the eager
        loop's shrinking batch beats a fixed shape; there is no launch cost to save) unless
        ``compile`` asks for the fixed shape."""
        if self.engine == "auto":
            return "graph" if device.type == "cuda" else ("fixed" if self.compile else "eager")
        if self.engine == "graph" and device.type != "cuda":
            raise ValueError("Backward Search engine 'graph' needs CUDA (use 'fixed' for the same loop uncaptured)")
        return self.engine

    def _invert_fixed(self, objective, heads, z0, properties, conditions, capture: bool) -> InversionResult:
        """The fixed-shape loop: the chunk padded to the next bucket size, every row stepped
        every time (a frozen or padding row is masked, so it does not move and keeps its best
        iterate and counters), the active mask read back every ``check_every`` steps only
        (0: never; run to max_iter). With ``capture`` on CUDA one step is a CUDA graph,
        captured once per (heads, properties, bucket, settings) and replayed. With ``compile``
        the step goes through torch.compile (fused element-wise kernels), compiled once per
        (heads, properties, bucket, settings but λ: λ is a tensor input, so every λ reuses it)
        and, on CUDA, captured after that."""
        cfg = self.config
        n = z0.shape[0]
        bucket = next(b for b in BUCKETS if b >= n)
        freezes = cfg.stopping in ("satisfied", "plateau", "plateau-ce")
        every = self.check_every if self.check_every is not None else (10 if z0.device.type == "cuda" else 1)
        if capture or self.compile:
            runner = _cached_step(self, objective, heads, tuple(properties), bucket, z0.device, conditions.dtype,
                                  capture)
            self.last_capture_s += runner.capture_s
            runner.capture_s = 0.0  # reported once, by the call that paid it
            if self.compile:
                self.compile_outcomes[bucket] = (runner.compiled, runner.compile_note or "")
        else:
            runner = _EagerStep(self, objective, heads, tuple(properties), bucket, z0.device, conditions.dtype)
        state = runner.state
        runner.reset(z0.detach().float(), conditions, n, cfg.lam)
        for it in range(cfg.max_iter):
            if freezes and every and it % every == 0 and not bool(state["active"].any()):
                break
            runner.step()
        full = {key: value[:n] for key, value in state.items()}
        return self._finish(objective, heads, {k: v.clone() for k, v in full.items()}, full["z0"].clone(),
                            properties, full["cond"].clone())

    def _step(self, objective, w: Mapping[str, torch.Tensor], adam: tuple[torch.Tensor, torch.Tensor],
              lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step of every row of ``w`` (the state: z0, cond, z, m1, m2, steps, active,
        best_loss, best_z, counter), frozen rows kept as they are: the new state. The eager
        loop and the fixed-shape loop (and the CUDA graph it captures) both take this step.
        ``adam``: Adam's step size and sqrt of the second bias correction per step count;
        ``lam``: λ as a tensor (a compiled step), else the config's."""
        cfg = self.config
        b1, b2, eps = 0.9, 0.999, 1e-8
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
            # torch.optim.Adam's arithmetic, element-wise: moments by lerp / mul+addcmul,
            # bias corrections in float64 (_adam_table), step lr/bc1 * m1 / (sqrt(m2)/sqrt(bc2) + eps)
            w["m1"] = torch.where(a, torch.lerp(w["m1"], grad, 1 - b1), w["m1"])
            w["m2"] = torch.where(a, torch.addcmul(w["m2"] * b2, grad, grad, value=1 - b2), w["m2"])
            t = w["steps"].long()[:, None]
            step_size, bc2_sqrt = adam[0][t], adam[1][t]
            # z.addcdiv(m1, denom, value=-step_size), with a step size per row
            step = (-step_size * w["m1"]) / (w["m2"].sqrt() / bc2_sqrt + eps)
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

    def _finish(self, objective, heads, full: Mapping[str, torch.Tensor], z0, properties, conditions
                ) -> InversionResult:
        """The returned vector of each row (per stopping rule), its step count and whether
        it satisfies every condition (by the heads themselves: what the model predicts)."""
        cfg = self.config
        z, steps, best_z, best_loss = full["z"], full["steps"], full["best_z"], full["best_loss"]
        final = z
        if cfg.stopping in ("plateau", "plateau-ce"):
            # the best iterate seen; the current one if it was never beaten (the loss the
            # loop compared, from the same objective)
            cur_loss, _, _ = objective(z, z0, conditions, satisfied=False)
            if cfg.stopping == "plateau-ce":
                cur_loss = cur_loss - regulariser(z - z0, cfg)
            final = torch.where((cur_loss < best_loss)[:, None], z, best_z)
        elif cfg.stopping == "authors-code":
            final = torch.where(torch.isfinite(best_loss)[:, None], best_z, z)
            steps = torch.full_like(steps, float(cfg.max_iter))  # the code never breaks
        sat = _satisfied_by_heads(heads, final, properties, conditions, cfg.confidence)
        with torch.no_grad():
            value, _, _ = objective(final, z0, conditions, satisfied=False)
        return InversionResult(final.detach(), steps.long(), sat, value.detach().double())

    # -- the search method --------------------------------------------------------------
    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        if ctx.model is None:
            raise ValueError("Backward Search needs the trained classifier heads (ctx.model)")
        model = ctx.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        z0 = ctx.query_embeddings(queries).to(ctx.device)
        cond = torch.as_tensor(queries.conditions, device=ctx.device)
        result = self.invert(model.heads, z0, queries.properties, cond)
        pos, score = ctx.index.search(result.z, k, exclude=ctx.exclude(queries))
        extras = {"iterations": result.iterations.cpu().numpy(), "satisfied": result.satisfied.cpu().numpy(),
                  "objective": result.objective.cpu().numpy()}
        if result.stop is not None:
            extras["stop"] = np.array(result.stop)
        return Ranking(pos.numpy(), score.numpy(), extras, query_vectors=result.z.detach().cpu().float().numpy())


def _satisfied_by_heads(heads: Mapping[str, torch.nn.Module], z: torch.Tensor, properties: Sequence[str],
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


def _joined(parts: Sequence[InversionResult]) -> InversionResult:
    stops = [p.stop for p in parts]
    return InversionResult(torch.cat([p.z for p in parts]), torch.cat([p.iterations for p in parts]),
                           torch.cat([p.satisfied for p in parts]), torch.cat([p.objective for p in parts]),
                           None if any(s is None for s in stops) else [r for s in stops for r in s])


def _validate(heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
              conditions: torch.Tensor) -> None:
    if not properties:
        raise ValueError("Backward Search needs at least one condition")
    for prop in properties:
        if prop not in heads:
            raise UnknownLabelError(f"unknown property '{prop}'; the model has heads for: {', '.join(heads)}")
    if z0.dim() != 2:
        raise ValueError(f"query embeddings must be (batch, dim), got shape {tuple(z0.shape)}")
    first = next(iter(heads.values()))
    linear = next(m for m in first.modules() if isinstance(m, torch.nn.Linear))
    if z0.shape[1] != linear.in_features:
        raise ValueError(f"query embeddings have size {z0.shape[1]}, the heads expect {linear.in_features}")
    if conditions.shape != (z0.shape[0], len(properties)):
        raise ValueError(f"conditions must be (batch, {len(properties)}), got {tuple(conditions.shape)}")
    for m, prop in enumerate(properties):
        n = next(mm for mm in reversed(list(heads[prop].modules())) if isinstance(mm, torch.nn.Linear)).out_features
        bad = (conditions[:, m] < 0) | (conditions[:, m] >= n)
        if bool(bad.any()):
            raise UnknownLabelError(f"condition class id out of range for '{prop}' (0..{n - 1})")


def _adam_table(cfg: BackwardSearchConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's step size lr / (1 - b1^t) and sqrt(1 - b2^t) for t = 0 .. max_iter + 1 (t = 0
    read as 1), computed in float64 as torch.optim.Adam does with Python floats (1 - 0.999^t
    in float32 is off by ~1e-5 relative) and cast once: one gather per step, not ten ops."""
    t = torch.arange(cfg.max_iter + 2, dtype=torch.float64).clamp(min=1)
    step_size = (cfg.lr / (1 - 0.9 ** t)).float()
    bc2_sqrt = (1 - 0.999 ** t).sqrt().float()
    return step_size.to(device), bc2_sqrt.to(device)


class _EagerStep:
    """Static state buffers of one bucket and one masked step on them, run op by op."""

    def __init__(self, search: BackwardSearch, objective, heads, properties: tuple[str, ...], bucket: int,
                 device: torch.device, cond_dtype: torch.dtype, compile: bool = False) -> None:
        self.search, self.objective, self.heads, self.properties = search, objective, heads, list(properties)
        self.adam = _adam_table(search.config, device)
        self.compiled = compile
        # λ of the current chunk; a tensor only for the compiled step (a Python float there
        # would be a constant of the compiled code: one compilation per λ)
        self.lam = torch.zeros((), device=device) if compile else None
        first = next(iter(heads.values()))
        d = next(m for m in first.modules() if isinstance(m, torch.nn.Linear)).in_features
        f32 = {"device": device, "dtype": torch.float32}
        self.state = {
            "z0": torch.zeros(bucket, d, **f32), "cond": torch.zeros(bucket, len(properties), dtype=cond_dtype,
                                                                   device=device),
            "z": torch.zeros(bucket, d, **f32), "m1": torch.zeros(bucket, d, **f32), "m2": torch.zeros(bucket, d, **f32),
            "steps": torch.zeros(bucket, **f32), "active": torch.zeros(bucket, dtype=torch.bool, device=device),
            "best_loss": torch.zeros(bucket, **f32), "best_z": torch.zeros(bucket, d, **f32),
            "counter": torch.zeros(bucket, **f32),
        }
        self.capture_s = 0.0
        self.compile_note: str | None = None  # a compiled step: verified, or why it fell back

    def reset(self, z0: torch.Tensor, conditions: torch.Tensor, n: int, lam: float = 0.0) -> None:
        """Load a chunk of n rows; the padding rows are inactive from the start."""
        st = self.state
        if self.lam is not None:
            self.lam.fill_(lam)
        for key in ("z0", "z", "best_z"):
            st[key].zero_()
            st[key][:n].copy_(z0)
        st["cond"].zero_()
        st["cond"][:n].copy_(conditions)
        for key in ("m1", "m2", "steps", "counter"):
            st[key].zero_()
        st["best_loss"].fill_(float("inf"))
        st["active"].zero_()
        st["active"][:n] = True

    def step(self) -> None:
        if self.compiled:
            if not hasattr(self, "_compiled_update"):
                self._compiled_update = torch.compile(self._update, dynamic=False)
            self._compiled_update(self.state, self.lam)
        else:
            self._update(self.state, None)

    def _update(self, state: dict[str, torch.Tensor], lam: torch.Tensor | None) -> None:
        new = self.search._step(self.objective, state, self.adam, lam)
        for key, value in new.items():
            if key not in ("z0", "cond"):
                state[key].copy_(value)  # in place: the graph replays on these buffers


class _CompiledStep(_EagerStep):
    """The step through torch.compile, compiled on first use (timed as capture_s), with its
    kernels in cir-bench's own cache (paths.kernel_cache_dir) and checked against the eager
    step before it is trusted (``verify_compiled_step``)."""

    def __init__(self, *args) -> None:
        import time

        from cir_bench.paths import use_kernel_cache

        _allow_recompiles()
        use_kernel_cache()
        super().__init__(*args, compile=True)
        t0 = time.perf_counter()
        self.reset(self.state["z0"][:0].clone(), self.state["cond"][:0].clone(), 0)  # every row inactive
        super().step()  # compiles
        self.capture_s = time.perf_counter() - t0
        self.compile_note = verify_compiled_step(self, _EagerStep(*args))


class CompiledStepMismatch(RuntimeError):
    """The compiled step does not compute what the eager step computes on the probe batch."""

    def __init__(self, median_distance: float, tolerance: float, same_topk: float) -> None:
        self.median_distance, self.tolerance, self.same_topk = median_distance, tolerance, same_topk
        super().__init__(f"the compiled step disagrees with the eager step on a probe batch (median normalised "
                         f"distance of z {median_distance:.3g} > {tolerance:.3g}, or identical top-10 of a probe "
                         f"gallery {same_topk:.0%} < {PROBE_MIN_SAME_TOPK:.0%})")


PROBE_STEPS = 8  # steps of the probe run that checks a compiled step against the eager one
PROBE_SEED = 20240611  # the probe batch is a fixed draw: the check is the same on every machine
PROBE_MIN_SAME_TOPK = 0.9
PROBE_GALLERY = 256  # random vectors the probe ranks, top-10 each


def verify_compiled_step(compiled: _EagerStep, eager: _EagerStep) -> str:
    """Run the compiled and the eager step ``PROBE_STEPS`` times on the same probe batch (a
    seeded draw of z0 and conditions filling the bucket) and compare: the median over rows of
    |z_c − z_e| / |z_e| must stay within PROBE_STEPS · fan-in · ε(float32) · 8 (a forward error
    bound of the heads' dot products, accumulated over the steps, with room for Adam's
    normalisation), and the top-10 of a seeded probe gallery (by dot product) must be the same
    for ≥ 90 % of the rows. Raises ``CompiledStepMismatch``; returns what it measured."""
    cfg = compiled.search.config
    state = compiled.state
    bucket, d = state["z0"].shape
    gen = torch.Generator().manual_seed(PROBE_SEED)
    z0 = torch.randn(bucket, d, generator=gen)
    classes = [next(m for m in reversed(list(compiled.heads[p].modules())) if isinstance(m, torch.nn.Linear))
               .out_features for p in compiled.properties]
    cond = torch.stack([torch.randint(0, n, (bucket,), generator=gen) for n in classes], 1)
    dev = state["z0"].device
    z0, cond = z0.to(dev), cond.to(device=dev, dtype=state["cond"].dtype)
    for runner in (compiled, eager):
        runner.reset(z0, cond, bucket, cfg.lam)
        for _ in range(PROBE_STEPS):
            runner.step()
    zc, ze = compiled.state["z"].float().cpu(), eager.state["z"].float().cpu()
    fan_in = max(m.in_features for p in compiled.properties for m in compiled.heads[p].modules()
                 if isinstance(m, torch.nn.Linear))
    tolerance = PROBE_STEPS * fan_in * torch.finfo(torch.float32).eps * 8
    dist = (zc - ze).norm(dim=1) / ze.norm(dim=1).clamp_min(1e-12)
    median = float(dist.median()) if torch.isfinite(dist).all() else float("inf")
    k = 10
    gallery = torch.randn(PROBE_GALLERY, d, generator=gen)
    top_c, top_e = (zc @ gallery.T).topk(k, dim=1).indices, (ze @ gallery.T).topk(k, dim=1).indices
    same = float((top_c.sort(dim=1).values == top_e.sort(dim=1).values).all(dim=1).float().mean())
    if not median <= tolerance or same < PROBE_MIN_SAME_TOPK:
        raise CompiledStepMismatch(median, tolerance, same)
    return (f"verified against the eager step on a {bucket}-row probe ({PROBE_STEPS} steps: median distance "
            f"{median:.1e} <= {tolerance:.1e}, identical top-{k} of a probe gallery {same:.0%})")


class _GraphStep(_EagerStep):
    """The same step (compiled or not) captured once in a CUDA graph and replayed (one launch
    per step); the warm-up before the capture is where a compiled step compiles."""

    def __init__(self, *args, compile: bool = False) -> None:
        super().__init__(*args, compile=compile)
        import time

        t0 = time.perf_counter()
        self.reset(self.state["z0"][:0].clone(), self.state["cond"][:0].clone(), 0)  # every row inactive
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (autograd, cuBLAS handles)
            for _ in range(3):
                super().step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            super().step()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0

    def step(self) -> None:
        self.graph.replay()


_GRAPH_CACHE: dict[tuple, tuple[Any, _GraphStep]] = {}
_GRAPH_CACHE_SIZE = 32


def _cached_step(search: BackwardSearch, objective, heads, properties: tuple[str, ...], bucket: int,
                 device: torch.device, cond_dtype: torch.dtype, capture: bool) -> _EagerStep:
    """The captured and/or compiled step for (heads and their weights, properties, bucket,
    device, settings, gradient, compile), reused across calls and instances; a weak reference
    checks that ``heads`` is still the same object, the state version that its weights did not
    change (the analytic objective captured copies of them). A compiled step takes λ as an
    input, so λ is not part of its key."""
    import json
    import weakref

    settings = asdict(search.config)
    if search.compile:
        settings.pop("lam")
    key = (id(heads), properties, bucket, str(device), str(cond_dtype), type(objective).__name__, capture,
           search.compile, state_version({p: heads[p] for p in properties}), json.dumps(settings, sort_keys=True,
                                                                                    default=str))
    hit = _GRAPH_CACHE.get(key)
    if hit is not None and hit[0]() is heads:
        return hit[1]
    args = (search, objective, heads, properties, bucket, device, cond_dtype)
    try:
        if capture and search.compile:
            _allow_recompiles()
            runner = _GraphStep(*args, compile=True)
            runner.compile_note = verify_compiled_step(runner, _EagerStep(*args))
        elif capture:
            runner = _GraphStep(*args)
        else:
            runner = _CompiledStep(*args)
    except Exception as err:  # noqa: BLE001 -- no compiler, a failed build, a mismatch: never fatal
        if not search.compile:
            raise
        runner = _GraphStep(*args) if capture else _EagerStep(*args)
        runner.compile_note = f"fell back to the uncompiled step: {_compile_failure(err)}"
    if search.compile and not runner.compiled:
        print(f"cir-bench: Backward Search compile (bucket {bucket}, {', '.join(properties)}): "
              f"{runner.compile_note}", file=sys.stderr, flush=True)
    if len(_GRAPH_CACHE) >= _GRAPH_CACHE_SIZE:
        _GRAPH_CACHE.pop(next(iter(_GRAPH_CACHE)))
    _GRAPH_CACHE[key] = (weakref.ref(heads), runner)
    return runner


def _compile_failure(err: Exception) -> str:
    """Why compiling failed, in one line, and what it needs."""
    if isinstance(err, CompiledStepMismatch):
        return str(err)
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return (f"torch.compile failed ({type(err).__name__}: {first}); it needs a C++ compiler (g++) on the CPU "
            "and Triton on CUDA")


def _allow_recompiles() -> None:
    """Every compiled step is the same code (``_EagerStep._update``) with other heads,
    properties, bucket or settings: torch.compile counts each as a recompilation of that code
    and, past its limit (8), would quietly run the rest uncompiled. Allow as many as the cache
    holds."""
    import torch._dynamo

    conf = torch._dynamo.config
    name = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, name, max(getattr(conf, name), 2 * _GRAPH_CACHE_SIZE))
