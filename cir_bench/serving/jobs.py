"""What travels between the stages of a served search (cir_bench.serving.orchestrate and
the components, in one process or through Ray deployment handles): frozen and typed.

    ParsedRequest (requests.py) -> SearchJob -> teacher | student -> Searched
                                -> RankJob   -> index             -> Ranked
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SearchJob:
    """A query vector and its conditions, for the teacher (Backward Search) or a student."""

    z0: Any  # (d,) numpy array
    properties: tuple[str, ...]
    classes: tuple[int, ...]  # class id per property
    lam: float | None = None  # the teacher's λ; None: the served config's


@dataclass(frozen=True)
class Searched:
    """The vector a query is ranked with, and what the search that made it reports."""

    z: Any  # (d,) numpy array, or a torch tensor left on the device for an index in the same process
    batch_size: int = 1  # how many jobs the stage searched together
    iterations: int | None = None  # the teacher: steps taken
    satisfied: bool | None = None  # the teacher: every head predicts its condition at z
    lam: float | None = None  # the teacher: the λ it used
    inversion_ms: float | None = None  # the teacher: its own compute for the batch, without the hops


@dataclass(frozen=True)
class RankFilter:
    """filtered_knn (hard) / soft_filtered_knn (soft): ranked with the heads' view of the
    database (cir_bench.search.label_filters)."""

    kind: Literal["hard", "soft"]
    properties: tuple[str, ...]
    classes: tuple[int, ...]
    beta: float = 0.0


@dataclass(frozen=True)
class RankJob:
    z: Any  # (d,) numpy array or torch tensor
    k: int
    exclude: int = -1  # an item position left out of the answer (the query itself), -1 for none
    filter: RankFilter | None = None


@dataclass(frozen=True)
class Ranked:
    positions: list[int]
    scores: list[float]
