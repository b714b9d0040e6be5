"""Soft filtered kNN: rank the database by cos(z0, x) + β · log p(c | x).

p(c | x) is what the trained heads give each database item for the condition's label(s);
with several conditioned properties the log-probabilities add (the heads treated as
independent): β · Σ_m log p_m(c_m | x). β = 0 is plain kNN; as β grows the ranking tends to
"most probably satisfying first", ties in probability broken by the cosine. One parameter,
the same heads as Backward Search and no optimisation per query: the baseline the
precision–context frontier of the report compares Backward Search with. The returned scores
are the combined scores (what the ranking sorts), not cosines.
"""
from __future__ import annotations

import math

import torch

from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.search.filtered_knn import rank_database
from cir_bench.search.label_filters import database_log_probs, soft_filter_scores


class SoftFilteredKNN(SearchMethod):
    name = "soft_filtered_knn"

    def __init__(self, beta: float = 0.1) -> None:
        beta = float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"soft_filtered_knn: beta must be a finite number >= 0, got {beta}")
        self.beta = beta

    def params(self) -> dict[str, float]:
        return {"beta": self.beta}

    def _log_probs(self, ctx: SearchContext, prop: str) -> torch.Tensor:
        """(N_db, C) log-probabilities of ``prop``'s head on the database rows, once per run."""
        if ctx.model is None:
            raise ValueError("soft_filtered_knn needs the trained classifier heads (ctx.model)")
        cache = ctx.cache.setdefault("database_log_probs", {})
        if prop not in cache:
            z = ctx.store.z[torch.as_tensor(ctx.database)].to(ctx.device)
            cache[prop] = database_log_probs(ctx.model.heads[prop], z)
        return cache[prop]

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        log_p = [self._log_probs(ctx, p).to(ctx.device) for p in queries.properties]
        cond = torch.as_tensor(queries.conditions, device=ctx.device)

        def soft(sl: slice, sim: torch.Tensor) -> torch.Tensor:
            return soft_filter_scores(sim, log_p, cond[sl], self.beta)

        pos, _, score = rank_database(ctx, queries, k, soft)
        return Ranking(pos, score)
