"""Filtered kNN: keep the database items whose labels match every condition, rank them
by cosine similarity to z0.

``filtered_knn`` reads the labels the trained heads *predict* for each database item
(computed once per store), a baseline none of the papers report; ``oracle_filtered_knn``
reads the ground-truth labels and is an upper reference, not a method a user could run on
unlabelled data.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.index import rank_scores
from cir_bench.index.base import result_size
from cir_bench.search.label_filters import database_labels, hard_filter_scores


class FilteredKNN(SearchMethod):
    name = "filtered_knn"
    oracle = False

    def _labels(self, ctx: SearchContext, prop: str) -> np.ndarray:
        """Label of ``prop`` for every database item (row order of ``ctx.database``)."""
        if self.oracle:
            return ctx.dataset.labels(prop)[ctx.database]
        if ctx.model is None:
            raise ValueError("filtered_knn needs the trained classifier heads (ctx.model)")
        cache = ctx.cache.setdefault("predicted_labels", {})
        if prop not in cache:
            z = ctx.store.z[torch.as_tensor(ctx.database)].to(ctx.device)
            cache[prop] = database_labels(ctx.model.heads[prop], z).cpu().numpy()
        return cache[prop]

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        """Matching items first by cosine, then (only if fewer than k match) the rest by cosine."""
        labels = torch.as_tensor(np.stack([self._labels(ctx, p) for p in queries.properties], axis=1),
                                 device=ctx.device)  # (N_db, M)
        cond = torch.as_tensor(queries.conditions, device=ctx.device)

        def bonus(sl: slice, sim: torch.Tensor) -> torch.Tensor:
            return hard_filter_scores(sim, labels, cond[sl])

        pos, cosine, _ = rank_database(ctx, queries, k, bonus)
        return Ranking(pos, cosine)


def rank_database(ctx: SearchContext, queries: QuerySet, k: int,
                  adjust: Callable[[slice, torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank every database row by ``adjust(rows of this chunk, cosine to z0)``, self-matches
    masked, in chunks of queries that bound memory. Returns the ranked item positions, their
    cosines and their adjusted scores."""
    q = torch.nn.functional.normalize(ctx.query_embeddings(queries).to(ctx.device).float(), dim=1)
    exclude = ctx.exclude(queries)
    ex_local = torch.as_tensor(ctx.index.local(exclude), device=ctx.device) if exclude is not None else None
    positions = torch.as_tensor(ctx.index.positions)
    out_pos, out_cos, out_score = [], [], []
    for start in range(0, len(queries), ctx.index.chunk):
        sl = slice(start, start + ctx.index.chunk)
        sim = q[sl] @ ctx.index.z.to(ctx.device).T
        ranked = adjust(sl, sim)
        idx, top = rank_scores(ranked if ranked is not sim else sim.clone(),
                               result_size(k, sim.shape[1], exclude), None if ex_local is None else ex_local[sl])
        out_pos.append(positions[idx.cpu()])
        out_cos.append(torch.gather(sim, 1, idx).cpu())
        out_score.append(top.cpu())
    return torch.cat(out_pos).numpy(), torch.cat(out_cos).numpy(), torch.cat(out_score).numpy()


class OracleFilteredKNN(FilteredKNN):
    """Upper reference: filters with ground-truth labels."""

    name = "oracle_filtered_knn"
    oracle = True
