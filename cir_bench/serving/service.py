"""The search service in one process: the four components (cir_bench.serving.components)
called directly, through the same orchestration as the Ray Serve app (serve/app.py), so an
HTTP answer equals the in-process one by construction. Used by tests and micro-benchmarks."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np

from cir_bench.serving.components import EncoderStage, IndexStage, ServeBundle, StudentStage, TeacherStage
from cir_bench.serving.orchestrate import answer
from cir_bench.serving.jobs import Ranked, RankJob, Searched, SearchJob
from cir_bench.serving.requests import ParsedRequest, RequestError, RequestParser, ServiceLimits, example_requests


class LocalStages:
    """``Stages`` as direct calls: a list handed to a stage is one batch."""

    def __init__(self, encoder: EncoderStage, teacher: TeacherStage, student: StudentStage,
                 index: IndexStage) -> None:
        self.encoder, self.teacher, self.student, self.index = encoder, teacher, student, index

    async def embed(self, images: list[bytes]) -> list[np.ndarray]:
        return list(self.encoder.embed(images))

    async def vectors(self, positions: list[int]) -> list[np.ndarray]:
        return list(self.index.vectors(positions))

    async def invert(self, jobs: list[SearchJob]) -> list[Searched]:
        return self.teacher.invert_many(jobs)

    async def transform(self, jobs: list[SearchJob]) -> list[Searched]:
        return self.student.transform_many(jobs)

    async def rank(self, jobs: list[RankJob]) -> list[Ranked]:
        return self.index.search_many(jobs)


class SearchService:
    """``search`` answers one request, ``search_many`` a list: requests sharing a method and a
    property set share one batched search, as concurrent requests do in the Serve app."""

    def __init__(self, bundle: ServeBundle, limits: ServiceLimits | None = None, device: str | None = None) -> None:
        self.bundle = bundle
        self.catalog = bundle.catalog
        self.limits = limits or ServiceLimits()
        self.parser = RequestParser(self.catalog, list(bundle.students), self.limits)
        self.encoder = EncoderStage(bundle, device)
        self.teacher = TeacherStage(bundle, device)
        self.student = StudentStage(bundle, device)
        self.index = IndexStage(bundle, device)
        self.stages = LocalStages(self.encoder, self.teacher, self.student, self.index)

    def properties(self) -> dict[str, list[str]]:
        return self.catalog.properties()

    def examples(self, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
        return example_requests(self.catalog, n, seed)

    def search(self, request: Any) -> dict[str, Any]:
        return self.search_many([request])[0]

    def search_many(self, requests: Sequence[Any]) -> list[dict[str, Any]]:
        """Validate each request, then answer the valid ones together; invalid ones come back
        as {"error": ..., "field": ...}."""
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = [{} for _ in requests]
        parsed: dict[int, ParsedRequest] = {}
        for i, r in enumerate(requests):
            try:
                parsed[i] = self.parser.parse(r)
            except RequestError as err:
                results[i] = {"error": str(err), "field": err.field}
        order = list(parsed)
        answers = asyncio.run(answer([parsed[i] for i in order], self.stages, self.catalog, t0))
        for i, a in zip(order, answers):
            results[i] = a
        return results
