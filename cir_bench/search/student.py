"""The ``student`` search method: the distilled student's z (cir_bench.models.student), then
cosine top-k."""
from __future__ import annotations

import torch

from cir_bench.data.queries import QuerySet
from cir_bench.models.student import Student
from cir_bench.search.base import Ranking, SearchContext, SearchMethod


class StudentSearch(SearchMethod):
    """Registered as ``student``: the distilled student's z, then cosine top-k.

    The pipeline distils (or loads) the student for the query set's properties, from
    Backward Search at ``lam`` (None: the run's λ), and hands it over in
    ``ctx.cache["students"][(tuple(properties), lam)]``.
    """

    name = "student"

    def __init__(self, student: Student | None = None, lam: float | None = None) -> None:
        self.student = student
        self.lam = None if lam is None else float(lam)

    def params(self) -> dict:
        return {} if self.lam is None else {"lam": self.lam}

    def _student(self, ctx: SearchContext, queries: QuerySet) -> Student:
        if self.student is not None:
            return self.student
        found = ctx.cache.get("students", {}).get((tuple(queries.properties), self.lam))
        if found is None:
            teacher = "the run's λ" if self.lam is None else f"λ = {self.lam:g}"
            raise ValueError(f"no distilled student for the properties {queries.properties} (teacher at {teacher}); "
                             "run it through the pipeline, which distils one")
        return found

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        student = self._student(ctx, queries).to(ctx.device).eval()
        if student.properties != list(queries.properties):
            raise ValueError(f"student was distilled for {student.properties}, queries condition {queries.properties}")
        z0 = ctx.query_embeddings(queries).to(ctx.device)
        cond = torch.as_tensor(queries.conditions, device=ctx.device)
        with torch.no_grad():
            z = student(z0, cond)
        pos, score = ctx.index.search(z, k, exclude=ctx.exclude(queries))
        return Ranking(pos.numpy(), score.numpy(), query_vectors=z.cpu().float().numpy())
