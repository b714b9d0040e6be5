"""The one orchestration of a search request, used by the in-process ``SearchService`` and by
the Ray Serve ingress (serve/app.py) alike; only the ``Stages`` differ (direct calls to the
components, or calls through deployment handles):

    z0     <- stages.embed (uploaded images) | stages.vectors (item ids)
    z      <- stages.invert (teacher: Backward Search) | stages.transform (student) | z0 (knn,
              filtered_knn, soft_filtered_knn: these rank with the heads' view of the database)
    top-k  <- stages.rank

Requests that reach a stage together go to it as one list, so a stage may batch them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol, Sequence

import numpy as np

from cir_bench.serving.jobs import Ranked, RankFilter, RankJob, Searched, SearchJob
from cir_bench.serving.requests import METHODS, Catalog, ParsedRequest


class Stages(Protocol):
    """The four components behind one interface; each call takes and returns a list."""

    async def embed(self, images: list[bytes]) -> list[np.ndarray]: ...

    async def vectors(self, positions: list[int]) -> list[np.ndarray]: ...

    async def invert(self, jobs: list[SearchJob]) -> list[Searched]: ...

    async def transform(self, jobs: list[SearchJob]) -> list[Searched]: ...

    async def rank(self, jobs: list[RankJob]) -> list[Ranked]: ...


def search_job(parsed: ParsedRequest, z0: np.ndarray) -> SearchJob:
    return SearchJob(z0, parsed.properties, parsed.classes, parsed.lam)


FILTERED = {"filtered_knn": "hard", "soft_filtered_knn": "soft"}


def rank_job(catalog: Catalog, parsed: ParsedRequest, z: Any) -> RankJob:
    exclude = parsed.position if parsed.position is not None and catalog.self_match == "exclude" else -1
    rank_filter = None
    if parsed.method in FILTERED:  # ranked with the heads' view of the database
        rank_filter = RankFilter(FILTERED[parsed.method], parsed.properties, parsed.classes, parsed.beta or 0.0)
    return RankJob(z, parsed.k, exclude, rank_filter)


def format_answer(catalog: Catalog, parsed: ParsedRequest, ranked: Ranked, searched: Searched) -> dict[str, Any]:
    """The JSON answer of one request (the HTTP response body, less its timing)."""
    items = []
    for p, s in zip(ranked.positions, ranked.scores):
        item = catalog.item(p)
        items.append({"id": item["id"], "score": s, "labels": item["labels"]})
    res: dict[str, Any] = {"method": parsed.method, "items": items, "batch_size": searched.batch_size}
    if parsed.method == "teacher":
        res.update(iterations=searched.iterations, satisfied=searched.satisfied, **{"lambda": searched.lam})
    if parsed.method == "soft_filtered_knn":
        res["beta"] = parsed.beta
    return res


async def _nothing() -> list:
    return []


async def answer(parsed: Sequence[ParsedRequest], stages: Stages, catalog: Catalog, t0: float,
                 t_parse: float | None = None) -> list[dict[str, Any]]:
    """Answers to validated requests, in order, each with server-side timing per stage in ms
    (``t0``: when the request arrived; ``t_parse``: when validation ended)."""
    t_parse = time.perf_counter() if t_parse is None else t_parse
    n = len(parsed)
    uploads = [i for i in range(n) if parsed[i].image_bytes is not None]
    items = [i for i in range(n) if parsed[i].position is not None]
    embedded, looked_up = await asyncio.gather(
        stages.embed([parsed[i].image_bytes for i in uploads]) if uploads else _nothing(),
        stages.vectors([parsed[i].position for i in items]) if items else _nothing())
    z0: dict[int, np.ndarray] = {**dict(zip(uploads, embedded)), **dict(zip(items, looked_up))}
    t_embed = time.perf_counter()

    groups = {m: [i for i in range(n) if parsed[i].method == m] for m in METHODS}
    calls = {"teacher": stages.invert, "student": stages.transform}
    methods = [m for m in METHODS if groups[m] and m in calls]
    answers = await asyncio.gather(*[calls[m]([search_job(parsed[i], z0[i]) for i in groups[m]]) for m in methods])
    searched: dict[int, Searched] = {}
    for m, out in zip(methods, answers):
        searched.update(zip(groups[m], out))
    for m in ("knn", *FILTERED):  # the query vector is z0; filtered methods rank differently
        for i in groups[m]:
            searched[i] = Searched(z0[i], len(groups[m]))
    t_search = time.perf_counter()

    ranked = await stages.rank([rank_job(catalog, parsed[i], searched[i].z) for i in range(n)]) if n else []
    t_rank = time.perf_counter()
    results = []
    for i in range(n):
        res = format_answer(catalog, parsed[i], ranked[i], searched[i])
        res["timing_ms"] = {"parse": 1000 * (t_parse - t0), "embed": 1000 * (t_embed - t_parse),
                            "search": 1000 * (t_search - t_embed), "rank": 1000 * (t_rank - t_search),
                            "total": 1000 * (time.perf_counter() - t0)}
        if searched[i].inversion_ms is not None:  # inside "search": the teacher's own compute, without the hops
            res["timing_ms"]["inversion"] = searched[i].inversion_ms
        results.append(res)
    return results
