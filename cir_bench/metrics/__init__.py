"""Metric registry and engine (docs/metrics.md is the contract).

Each metric lives in one function with its formula in the docstring; the registry maps a
key (``precision_at_k``) to an adapter that reads what the function needs from
``EvalInputs``. ``evaluate`` returns one row per query and one column per metric@k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from cir_bench.data.base import Dataset
from cir_bench.data.queries import QuerySet, relevant_mask
from cir_bench.metrics.average_precision import ap_at_k_hits, ap_at_k_minRk, ap_at_k_R
from cir_bench.metrics.context import context_at_k
from cir_bench.metrics.domain_conversion import dc_map, dc_precision_at_k, dc_recall_at_k, trapezoidal_ap
from cir_bench.metrics.hit_context import hit_context_at_k
from cir_bench.metrics.precision import precision_at_k
from cir_bench.metrics.recall import hit_at_k, recall_at_k
from cir_bench.metrics.tag_similarity import jaccard, mts_at_k, retrieved_similarity_at_k
from cir_bench.metrics.twin import twin_hit_at_k, twin_rank
from cir_bench.registry import Registry

SELF_MATCH_POLICIES = ("exclude", "keep")


@dataclass
class EvalInputs:
    """Everything the metrics read, for Q queries and ranked lists of length K."""

    ranked: np.ndarray  # (Q, K) item positions
    hits: np.ndarray  # (Q, K) bool
    n_relevant: np.ndarray  # (Q,) R after the self-match policy
    query_tags: list[frozenset]
    ranked_tags: list[list[frozenset]]
    query_factors: np.ndarray | None = None  # (Q, F) factor codes
    ranked_factors: np.ndarray | None = None  # (Q, K, F)
    context_compare: np.ndarray | None = None  # (Q, F) bool, the non-conditioned factors
    twin: np.ndarray | None = None  # (Q,) twin position in the database, -1 when none
    # domain-conversion protocol: correct = same class as the query and every condition met,
    # over each query's full ranking (Q, N'), and R per query over the whole database
    correct_full: np.ndarray | None = None
    n_correct: np.ndarray | None = None


@dataclass(frozen=True)
class MetricSpec:
    key: str  # e.g. "precision_at_k"; columns are key with k substituted: precision_at_10
    fn: Callable[[EvalInputs, int], np.ndarray]
    needs: str = "labels"  # labels | tags | factors | twins | domain


METRICS: Registry[MetricSpec] = Registry("metric")


def _register(key: str, fn: Callable[[EvalInputs, int], np.ndarray], needs: str = "labels") -> None:
    METRICS.register(key)(MetricSpec(key, fn, needs))


_register("precision_at_k", lambda e, k: precision_at_k(e.hits, k))
_register("ap_at_k_R", lambda e, k: ap_at_k_R(e.hits, e.n_relevant, k))
_register("ap_at_k_minRk", lambda e, k: ap_at_k_minRk(e.hits, e.n_relevant, k))
_register("ap_at_k_hits", lambda e, k: ap_at_k_hits(e.hits, k))
_register("hit_at_k", lambda e, k: hit_at_k(e.hits, k))
_register("recall_at_k", lambda e, k: recall_at_k(e.hits, e.n_relevant, k))
_register("mts_at_k", lambda e, k: mts_at_k(e.query_tags, e.ranked_tags, k), "tags")
_register("context_at_k", lambda e, k: context_at_k(e.query_factors, e.ranked_factors, e.context_compare, k),
          "factors")
_register("hit_context_at_k", lambda e, k: hit_context_at_k(e.query_factors, e.ranked_factors, e.context_compare,
                                                           e.hits, k), "factors")
_register("twin_hit_at_k", lambda e, k: twin_hit_at_k(e.ranked, e.twin, k), "twins")
_register("dc_precision_at_k", lambda e, k: dc_precision_at_k(e.correct_full, k, e.n_correct), "domain")
_register("dc_recall_at_k", lambda e, k: dc_recall_at_k(e.correct_full, k, e.n_correct), "domain")
_register("dc_map", lambda e, k: dc_map(e.correct_full, e.n_correct), "domain")

#: the paper's name for precision@k, reported beside it ("mAP@10, paper def.")
PAPER_ALIASES = {"precision_at_k": "map_at_k_paper"}


def metric_column(key: str, k: int) -> str:
    return key.replace("_k", f"_{k}", 1)


def find_twins(dataset: Dataset, queries: QuerySet, database: np.ndarray) -> np.ndarray:
    """Position of each query's exact counterfactual twin in the database, -1 if none.

    Twin = same group (scene), every factor equal to the query's except the conditioned
    properties, which equal the condition.
    """
    if not dataset.context_factors:
        return np.full(len(queries), -1, dtype=np.int64)
    in_db = set(int(p) for p in database)
    by_group: dict[str, list[int]] = {}
    for i, it in enumerate(dataset.items):
        if it.group is not None and i in in_db:
            by_group.setdefault(it.group, []).append(i)
    out = np.full(len(queries), -1, dtype=np.int64)
    for q, pos in enumerate(queries.positions):
        item = dataset.items[pos]
        for cand in by_group.get(item.group or "", []):
            c = dataset.items[cand]
            if cand == pos:
                continue
            ok = all(c.labels[p] == queries.conditions[q, m] for m, p in enumerate(queries.properties))
            ok = ok and all(c.factors[f] == item.factors[f] for f in dataset.context_factors
                            if f not in queries.properties)
            if ok:
                out[q] = cand
                break
    return out


def build_eval_inputs(dataset: Dataset, queries: QuerySet, ranked: np.ndarray, database: np.ndarray,
                      self_match: str = "exclude", twins: np.ndarray | None = None,
                      full_ranking: np.ndarray | None = None) -> EvalInputs:
    """What the metrics read. ``ranked``: the top-k lists; ``full_ranking``: each query's
    ranking of the whole database (for the domain-conversion metrics, when the dataset
    defines a class)."""
    if self_match not in SELF_MATCH_POLICIES:
        raise ValueError(f"unknown self-match policy '{self_match}'; valid: {SELF_MATCH_POLICIES}")
    ranked = np.asarray(ranked, dtype=np.int64)
    rel = relevant_mask(dataset, queries.properties, queries.conditions)  # (Q, N)
    in_db = np.zeros(len(dataset), dtype=bool)
    in_db[database] = True
    rel &= in_db[None, :]
    if self_match == "exclude":
        rel[np.arange(len(queries)), queries.positions] = False
    n_relevant = rel.sum(axis=1)
    hits = np.take_along_axis(rel, ranked, axis=1)
    tags = [it.tags for it in dataset.items]
    inputs = EvalInputs(
        ranked=ranked, hits=hits, n_relevant=n_relevant,
        query_tags=[tags[p] for p in queries.positions],
        ranked_tags=[[tags[p] for p in row] for row in ranked],
    )
    factors = dataset.context_factors
    if factors:
        vocab: dict[tuple[str, str], int] = {}
        codes = np.array([[vocab.setdefault((f, it.factors[f]), len(vocab)) for f in factors]
                          for it in dataset.items], dtype=np.int64)
        inputs.query_factors = codes[queries.positions]
        inputs.ranked_factors = codes[ranked]
        inputs.context_compare = np.array([[f not in queries.properties for f in factors]] * len(queries))
        inputs.twin = twins if twins is not None else find_twins(dataset, queries, database)
    if dataset.class_key is not None and full_ranking is not None:
        classes = dataset.class_codes()
        correct = rel & (classes[None, :] == classes[queries.positions][:, None])
        inputs.n_correct = correct.sum(axis=1)
        inputs.correct_full = np.take_along_axis(correct, np.asarray(full_ranking, dtype=np.int64), axis=1)
    return inputs


def ranking_depth(dataset: Dataset, database: np.ndarray, k: int) -> int:
    """How far a method must rank for the metrics: the whole database where the dataset defines
    a class (the domain-conversion metrics judge the whole ranking), else the top ``k``."""
    return len(database) if dataset.class_key is not None else k


def score_ranking(dataset: Dataset, queries: QuerySet, positions: np.ndarray, k: int, database: np.ndarray,
                  self_match: str = "exclude", twins: np.ndarray | None = None) -> pd.DataFrame:
    """The per-query metrics at ``k`` of a ranking ``positions`` (Q, ``ranking_depth``): its top
    ``k`` lists, and the whole ranking where it is longer. What every scored ranking goes through
    (a run's methods, the λ curve)."""
    positions = np.asarray(positions)
    inputs = build_eval_inputs(dataset, queries, positions[:, :k], database, self_match, twins,
                               full_ranking=positions if positions.shape[1] > k else None)
    return evaluate(inputs, ks=(k,))


def evaluate(inputs: EvalInputs, ks: tuple[int, ...] = (10,), metrics: list[str] | None = None) -> pd.DataFrame:
    """Per-query metric values, one column per (metric, k); alias columns included."""
    cols: dict[str, np.ndarray] = {}
    for key in metrics or METRICS.names():
        spec = METRICS.get(key)
        if spec.needs in ("factors",) and inputs.query_factors is None:
            continue
        if spec.needs == "twins" and (inputs.twin is None or not np.any(inputs.twin >= 0)):
            continue
        if spec.needs == "domain" and inputs.correct_full is None:
            continue
        for k in ks:
            if metric_column(key, k) in cols:  # a metric without a cutoff (dc_map)
                continue
            values = spec.fn(inputs, k)
            cols[metric_column(key, k)] = values
            if key in PAPER_ALIASES:
                cols[metric_column(PAPER_ALIASES[key], k)] = values
    if inputs.twin is not None and np.any(inputs.twin >= 0):
        cols["twin_rank"] = twin_rank(inputs.ranked, inputs.twin)
    return pd.DataFrame(cols)


def summarize(per_query: pd.DataFrame) -> dict[str, float]:
    """Micro average over queries (NaN-aware for the twin metrics, with their count)."""
    out: dict[str, float] = {}
    for col in per_query.columns:
        if col == "twin_rank":
            continue
        values = per_query[col].to_numpy(dtype=np.float64)
        out[col] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    if "twin_rank" in per_query:
        out["n_twin_queries"] = float(per_query["twin_rank"].notna().sum())
    return out


__all__ = [
    "METRICS", "MetricSpec", "EvalInputs", "build_eval_inputs", "evaluate", "summarize", "find_twins",
    "precision_at_k", "ap_at_k_R", "ap_at_k_minRk", "ap_at_k_hits", "hit_at_k", "recall_at_k", "hit_context_at_k",
    "mts_at_k", "retrieved_similarity_at_k", "context_at_k", "twin_rank", "twin_hit_at_k", "jaccard",
    "dc_map", "dc_precision_at_k", "dc_recall_at_k", "trapezoidal_ap",
]
