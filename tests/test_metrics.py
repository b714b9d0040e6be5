"""Metric engine: hand-computed cases and cross-checks against independent implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_bench.metrics import (ap_at_k_hits, ap_at_k_minRk, ap_at_k_R, context_at_k, hit_at_k, mts_at_k,
                               precision_at_k, recall_at_k, retrieved_similarity_at_k, twin_hit_at_k, twin_rank)

HITS = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]])
R = np.array([4, 3, 10, 2])


def test_hand_computed_cases():
    k = 5
    assert precision_at_k(HITS, k).tolist() == [0.4, 0.0, 1.0, 0.4]
    # numerators: q0 1 + 2/3; q2 5; q3 1/2 + 2/5
    num = np.array([1 + 2 / 3, 0.0, 5.0, 0.5 + 0.4])
    np.testing.assert_allclose(ap_at_k_R(HITS, R, k), num / R)
    np.testing.assert_allclose(ap_at_k_minRk(HITS, R, k), num / np.minimum(R, k))
    np.testing.assert_allclose(ap_at_k_hits(HITS, k), [num[0] / 2, 0.0, 1.0, num[3] / 2])
    assert hit_at_k(HITS, k).tolist() == [1.0, 0.0, 1.0, 1.0]
    np.testing.assert_allclose(recall_at_k(HITS, R, k), [2 / 4, 0, 5 / 10, 2 / 2])
    assert precision_at_k(HITS, 1).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_metric_errors_are_clear():
    with pytest.raises(ValueError, match="fewer than k"):
        precision_at_k(HITS, 6)
    with pytest.raises(ValueError, match="R = 0"):
        ap_at_k_R(HITS, np.array([1, 0, 1, 1]), 5)


def test_tag_metrics():
    q = [frozenset({"a", "b"}), frozenset()]
    ranked = [[frozenset({"a", "b"}), frozenset({"c"}), frozenset({"b", "c"})], [frozenset(), frozenset({"x"})]]
    np.testing.assert_allclose(mts_at_k(q, ranked, 2), [(1 + 0) / 2, 0.0])
    np.testing.assert_allclose(mts_at_k(q[:1], ranked[:1], 3), [(1 + 0 + 1 / 3) / 3])
    a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = np.array([[4, 3, 2, 1], [5, 9, 10, 11]])
    np.testing.assert_allclose(retrieved_similarity_at_k(a, b, 4), [1.0, 1 / 7])
    np.testing.assert_allclose(retrieved_similarity_at_k(a, b, 1), [0.0, 1.0])


def test_context_and_twin():
    qf = np.array([[0, 1, 2, 3]])
    rf = np.array([[[9, 1, 2, 3], [0, 1, 9, 9], [0, 0, 0, 0]]])
    compare = np.array([[False, True, True, True]])  # factor 0 is the conditioned one
    np.testing.assert_allclose(context_at_k(qf, rf, compare, 2), [(1 + 1 / 3) / 2])
    np.testing.assert_allclose(context_at_k(qf, rf, compare, 3), [(1 + 1 / 3 + 0) / 3])
    ranked = np.array([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    assert twin_rank(ranked, np.array([7, 1, -1]))[:2].tolist() == [3.0, float("inf")]
    hits = twin_hit_at_k(ranked, np.array([7, 1, -1]), 2)
    assert hits[:2].tolist() == [0.0, 0.0] and np.isnan(hits[2])
    assert twin_hit_at_k(ranked, np.array([7, 1, -1]), 3)[0] == 1.0


def _random_fixture(seed: int, n_queries: int = 30, n_docs: int = 60, k: int = 10):
    rng = np.random.default_rng(seed)
    ranked = np.stack([rng.permutation(n_docs)[:k] for _ in range(n_queries)])
    relevant = rng.uniform(size=(n_queries, n_docs)) < rng.uniform(0.05, 0.4, size=(n_queries, 1))
    relevant[np.arange(n_queries), rng.integers(n_docs, size=n_queries)] = True  # R >= 1
    hits = np.take_along_axis(relevant, ranked, axis=1)
    return ranked, relevant, hits, relevant.sum(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_trec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    k = 10
    ranked, relevant, hits, n_rel = _random_fixture(seed, k=k)
    qrels = {f"q{q}": {f"d{d}": 1 for d in np.flatnonzero(relevant[q])} for q in range(len(ranked))}
    run = {f"q{q}": {f"d{d}": float(k - i) for i, d in enumerate(ranked[q])} for q in range(len(ranked))}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {f"map_cut.{k}", f"recall.{k}", f"P.{k}", f"success.{k}"})
    res = ev.evaluate(run)
    order = [f"q{q}" for q in range(len(ranked))]
    np.testing.assert_allclose(ap_at_k_R(hits, n_rel, k), [res[q][f"map_cut_{k}"] for q in order], atol=1e-6)
    np.testing.assert_allclose(recall_at_k(hits, n_rel, k), [res[q][f"recall_{k}"] for q in order], atol=1e-6)
    np.testing.assert_allclose(precision_at_k(hits, k), [res[q][f"P_{k}"] for q in order], atol=1e-6)
    np.testing.assert_allclose(hit_at_k(hits, k), [res[q][f"success_{k}"] for q in order], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_against_torchmetrics(seed):
    tm = pytest.importorskip("torchmetrics.retrieval")
    k = 10
    ranked, relevant, hits, n_rel = _random_fixture(seed, k=k)
    n_q, n_docs = relevant.shape
    # full score matrix, strictly positive (torchmetrics >= 1.8 drops scores <= 0)
    scores = np.full((n_q, n_docs), 0.01)
    for q in range(n_q):
        scores[q, ranked[q]] = np.arange(k, 0, -1) + 1.0
    metric = tm.RetrievalMAP(top_k=k)
    indexes = torch.arange(n_q).repeat_interleave(n_docs)
    ours = ap_at_k_hits(hits, k)
    got = metric(torch.tensor(scores.ravel()), torch.tensor(relevant.ravel()), indexes=indexes)
    assert float(got) == pytest.approx(ours.mean(), abs=1e-6)
    metric_p = tm.RetrievalPrecision(top_k=k)
    got_p = metric_p(torch.tensor(scores.ravel()), torch.tensor(relevant.ravel()), indexes=indexes)
    assert float(got_p) == pytest.approx(precision_at_k(hits, k).mean(), abs=1e-6)


def test_hit_context_counts_only_the_correct_results():
    """Against a plain loop on random data; NaN without hits; in metrics.csv of a run."""
    import math

    from cir_bench.metrics import METRICS
    from cir_bench.metrics.hit_context import hit_context_at_k

    rng = np.random.default_rng(5)
    q, k, f = 30, 10, 6
    qf = rng.integers(0, 3, size=(q, f))
    rf = rng.integers(0, 3, size=(q, k + 2, f))
    compare = rng.random((q, f)) < 0.7
    compare[:, 0] = True
    hits = rng.random((q, k + 2)) < 0.3
    hits[0] = False
    got = hit_context_at_k(qf, rf, compare, hits, k)
    for i in range(q):
        items = [j for j in range(k) if hits[i, j]]
        if not items:
            assert math.isnan(got[i])
            continue
        per = [np.mean([rf[i, j, c] == qf[i, c] for c in range(f) if compare[i, c]]) for j in items]
        assert got[i] == pytest.approx(np.mean(per))
    assert "hit_context_at_k" in METRICS
