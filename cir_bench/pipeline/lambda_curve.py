"""The λ curve of a run: Backward Search as the run configures it (its preset: λ decides when
it stops as much as what it minimises) beside Eq 4 solved to its tolerance (the ``converged``
preset, search/proximal.py) on the same objective, over a λ grid, per query: metrics, the
objective reached, steps and why each query stopped. Written to ``lambda_curve.parquet``; the
report draws both curves and compares the objectives."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from cir_bench.config import RunConfig
from cir_bench.data.base import Dataset
from cir_bench.data.queries import QuerySet
from cir_bench.metrics import ranking_depth, score_ranking
from cir_bench.pipeline.steps import teacher
from cir_bench.search import SearchContext
from cir_bench.search.backward import BackwardSearch

SOLVERS = ("preset", "converged")


@dataclass(frozen=True)
class CurveSolver:
    """One curve: its name in the file and the search it runs (at every λ of the grid)."""

    name: str
    search: BackwardSearch


def curve_solvers(cfg: RunConfig) -> list[CurveSolver]:
    """``preset``: the run's Backward Search; ``converged``: the converged solver on the
    same objective (regulariser, reduction, condition weights and averaging taken from it)."""
    run_search = teacher(cfg)
    out = []
    for name in cfg.eval.lambda_curve_solvers:
        if name == "preset":
            out.append(CurveSolver("preset", run_search))
        else:
            c = run_search.config
            extra = {key: getattr(cfg.search, key) for key in ("tol", "budget_confidence")
                     if getattr(cfg.search, key) is not None}
            out.append(CurveSolver("converged", BackwardSearch(
                "converged", regularizer=c.regularizer, reduction=c.reduction,
                condition_weights=dict(c.condition_weights), average_conditions=c.average_conditions,
                gradient=run_search.gradient, **extra)))
    return out


def lambda_curve(cfg: RunConfig, dataset: Dataset, ctx: SearchContext, queries: QuerySet, set_name: str,
                 twins: np.ndarray | None, log: Callable[[str], Any] = print) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per query, solver and λ of ``cfg.eval.lambda_curve``: the per-query metrics at k, the
    objective at the returned z, the steps taken and (converged) why it stopped and its last
    gradient-mapping norm (``stationarity``, NaN for the preset). Also the
    seconds each solver took over the whole grid."""
    lams = [float(v) for v in cfg.eval.lambda_curve]
    k = cfg.eval.k
    depth = ranking_depth(dataset, ctx.database, k)
    z0 = ctx.query_embeddings(queries).to(ctx.device)
    cond = torch.as_tensor(queries.conditions, device=ctx.device)
    heads = ctx.model.heads
    qids = queries.to_frame(dataset)["query_id"].to_numpy()
    frames, seconds = [], {}
    for solver in curve_solvers(cfg):
        t0 = time.perf_counter()
        results = solver.search.invert_grid(heads, z0, queries.properties, cond, lams)
        seconds[solver.name] = time.perf_counter() - t0
        for lam, r in zip(lams, results):
            pos, _ = ctx.index.search(r.z, depth, exclude=ctx.exclude(queries))
            per_query = score_ranking(dataset, queries, pos.numpy(), k, ctx.database, cfg.eval.self_match, twins)
            # query_index: the query's row in its set (an item can be queried under several conditions)
            frame = pd.DataFrame({"query_set": set_name, "solver": solver.name, "lam": lam,
                                  "query_index": np.arange(len(qids)), "query_id": qids,
                                  "objective": r.objective.cpu().numpy().astype(float),
                                  "iterations": r.iterations.cpu().numpy(),
                                  "satisfied": r.satisfied.cpu().numpy(),
                                  "stop": r.stop if r.stop is not None else "preset rule",
                                  "stationarity": (r.stationarity.cpu().numpy().astype(float)
                                                   if r.stationarity is not None else np.nan)})
            for col in per_query.columns:
                frame[f"metric_{col}"] = per_query[col].to_numpy()
            frames.append(frame)
        log(f"  λ curve, {solver.name}: {len(lams)} values of λ in {seconds[solver.name]:.1f} s")
    return pd.concat(frames, ignore_index=True), seconds
