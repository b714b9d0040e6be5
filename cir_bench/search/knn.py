"""k-nearest search: cosine neighbours of the query embedding z0, condition ignored."""
from __future__ import annotations

from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod


class KNNSearch(SearchMethod):
    """The unconditioned reference: top-k cosine neighbours of z0 (paper Eq 3)."""

    name = "knn"

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        pos, score = ctx.index.search(ctx.query_embeddings(queries), k, exclude=ctx.exclude(queries))
        return Ranking(pos.numpy(), score.numpy())
