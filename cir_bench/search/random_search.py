"""Random search: k database items drawn uniformly without replacement (seeded)."""
from __future__ import annotations

import numpy as np

from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod


class RandomSearch(SearchMethod):
    """Expected precision@k = the condition's prior in the database.

    Each query draws from ``default_rng([seed, query position, *conditions])``, so its
    list does not depend on the other queries (unlike the authors' unseeded version).
    """

    name = "random"

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        db = ctx.database
        exclude = ctx.exclude(queries)
        if k > len(db) - (exclude is not None):  # a ranking of the whole database
            k = len(db) - (exclude is not None)
        out_pos = np.empty((len(queries), k), dtype=np.int64)
        out_score = np.empty((len(queries), k))
        for q, pos in enumerate(queries.positions):
            rng = np.random.default_rng([ctx.seed, 17, int(pos), *queries.conditions[q].tolist()])
            pool = db if exclude is None else db[db != pos]
            if len(pool) < k:
                raise ValueError(f"database has {len(pool)} items, fewer than k={k}")
            out_pos[q] = rng.choice(pool, size=k, replace=False)
            out_score[q] = np.sort(rng.uniform(size=k))[::-1]
        return Ranking(out_pos, out_score)
