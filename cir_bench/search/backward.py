"""Backward Search (paper Eq 4, Algorithm 1), floor 3 of 3: the search method.

    z* = argmin_z  sum_m w_m * CE(phi_m(z), c_m) + lambda * R(z - z0)

by gradient steps on z alone, the heads frozen in eval mode (BN running statistics, no
dropout), then retrieve the database items nearest to z*.

Batching changes nothing: the loss is a sum of per-query terms and the optimiser state is
per element, so every query follows the same trajectory it would follow alone. A query whose
stopping rule fires is frozen (its z, optimiser state and step count stop) while the rest go
on; the loop ends when all are frozen.

The floors: search/backward_step.py (settings, presets, the masked step),
search/backward_engines.py (eager, fixed, compiled and graph loops), this file (the method:
λ, the engine choice, ``from_config`` for every caller). The converged preset runs its own
solver (search/proximal.py).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Mapping, Sequence, get_args

import numpy as np
import torch

from cir_bench.config import BackwardPreset, Engine, Gradient, SearchConfig
from cir_bench.data.queries import QuerySet
from cir_bench.search.backward_engines import BUCKETS, ENGINES, resolve_engine, run_eager, run_fixed
from cir_bench.search.backward_step import (CONVERGED_ONLY, IMPLEMENTATION_VERSION, PRESETS, BackwardSearchConfig,
                                            InversionResult, joined, satisfied_by_heads, validate_inputs)
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.search.objective import objective_for
from cir_bench.search.proximal import solve_to_tolerance

__all__ = ["BackwardSearch", "BackwardSearchConfig", "InversionResult", "PRESETS", "IMPLEMENTATION_VERSION",
           "BUCKETS", "ENGINES", "GRADIENTS"]
GRADIENTS: tuple[str, ...] = get_args(Gradient)
GRID_ROWS = 16384  # the converged solver over a λ grid: at most this many (query, λ) rows per batch


class BackwardSearch(SearchMethod):
    """Registered as ``backward``; ``BackwardSearch("authors-code", lam=1.1)``. ``engine``,
    ``check_every``, ``gradient`` and ``compile`` say how the loop runs, not what it computes
    (they are not in ``params()``); ``overrides`` change the preset's settings."""

    name = "backward"

    def __init__(self, preset: BackwardPreset = "paper", lam: float | None = None, *, engine: Engine = "auto",
                 check_every: int | None = None, gradient: Gradient = "auto", compile: bool = False,
                 **overrides: Any) -> None:
        for what, value, allowed in (("preset", preset, PRESETS), ("engine", engine, ENGINES),
                                     ("gradient", gradient, GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"unknown Backward Search {what} '{value}'; available: {', '.join(allowed)}")
        if check_every is not None and int(check_every) < 0:
            raise ValueError(f"check_every must be >= 0 (0: never, run to max_iter), got {check_every}")
        if compile and engine == "eager":
            raise ValueError("compile needs the fixed-shape loop (engine 'fixed', 'graph' or 'auto'); the eager "
                             "loop changes shape as queries freeze")
        if lam is not None:
            overrides["lam"] = float(lam)
        self.preset, self.engine, self.check_every, self.gradient = preset, engine, check_every, gradient
        self.compile = bool(compile)
        self.config = replace(PRESETS[preset], **overrides)
        if self.config.optimizer == "proximal" and (compile or engine in ("fixed", "graph")):
            raise ValueError("the converged solver runs its own loop (search/proximal.py): engine 'fixed'/'graph' "
                             "and compile apply to the Adam presets")
        self.last_capture_s = 0.0  # seconds spent compiling / capturing CUDA graphs in the last invert()
        # with compile: per bucket used, whether the compiled step runs and what its check found
        self.compile_outcomes: dict[int, tuple[bool, str]] = {}

    @classmethod
    def from_config(cls, search: SearchConfig, lam: float | None = None, **changes: Any) -> "BackwardSearch":
        """The search a run config's ``search`` section describes, at ``lam`` when given
        (else the section's), with ``changes`` over its settings (e.g. ``compile=False``)."""
        return cls(search.preset, float(search.lam if lam is None else lam), **{**search.overrides(), **changes})

    def at_lambda(self, lam: float) -> "BackwardSearch":
        """The same search at another λ."""
        other = BackwardSearch(self.preset, engine=self.engine, check_every=self.check_every, gradient=self.gradient,
                               compile=self.compile)
        other.config = replace(self.config, lam=float(lam))
        return other

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

    def resolved_engine(self, device: torch.device) -> str:
        return resolve_engine(self.engine, self.compile, device)

    # -- the inversion -----------------------------------------------------------------
    def invert(self, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
               conditions: torch.Tensor) -> InversionResult:
        """Run the search for a batch; ``conditions`` (B, M) class ids, column m = properties[m]."""
        cfg = self.config
        validate_inputs(heads, z0, properties, conditions)
        self.last_capture_s = 0.0
        if cfg.optimizer == "proximal":  # Eq 4 to the tolerance, in chunks of batch_size
            return joined([self._converged(heads, z0[sl], properties, conditions[sl])
                           for sl in _chunks(z0.shape[0], cfg.batch_size)])
        engine = self.resolved_engine(z0.device)
        objective = objective_for(heads, properties, cfg, analytic=self.gradient == "auto")
        if engine == "eager":
            return joined([run_eager(cfg, objective, heads, z0[sl], properties, conditions[sl])
                           for sl in _chunks(z0.shape[0], cfg.batch_size)])
        parts = []
        for sl in _chunks(z0.shape[0], BUCKETS[-1]):
            run = run_fixed(cfg, objective, heads, z0[sl], properties, conditions[sl], capture=engine == "graph",
                            compile=self.compile, check_every=self.check_every)
            self.last_capture_s += run.capture_s
            if self.compile:
                self.compile_outcomes[run.bucket] = (run.compiled, run.compile_note)
            parts.append(run.result)
        return joined(parts)

    def invert_grid(self, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor, properties: Sequence[str],
                    conditions: torch.Tensor, lams: Sequence[float]) -> list[InversionResult]:
        """``invert`` at every λ of ``lams`` (everything else as configured). The converged
        solver takes the whole grid as one batch, a λ per row: its loop's cost is per step,
        not per row."""
        lams = [float(v) for v in lams]
        if self.config.optimizer != "proximal":
            return [self.at_lambda(lam).invert(heads, z0, properties, conditions) for lam in lams]
        validate_inputs(heads, z0, properties, conditions)
        n = z0.shape[0]
        zz, cc = z0.repeat(len(lams), 1), conditions.repeat(len(lams), 1)
        ll = torch.tensor(lams, dtype=torch.float64).repeat_interleave(n)
        rows_per_chunk = max(GRID_ROWS // max(n, 1), 1) * n  # whole λ blocks per chunk
        grid = joined([self._converged(heads, zz[sl], properties, cc[sl], ll[sl])
                       for sl in _chunks(zz.shape[0], rows_per_chunk)])
        return [grid.rows(slice(i * n, (i + 1) * n)) for i in range(len(lams))]

    def _converged(self, heads, z0, properties, conditions, lams=None) -> InversionResult:
        r = solve_to_tolerance(heads, z0, properties, conditions, self.config, lams=lams,
                               analytic=self.gradient == "auto")
        sat = satisfied_by_heads(heads, r.z, properties, conditions, self.config.confidence)
        return InversionResult(r.z, r.iterations, sat, r.objective, r.stop, r.stationarity)

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


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]
