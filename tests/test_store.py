"""Exact cosine top-k search against a brute-force numpy reference, ties and self-match."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_bench.embed import EmbeddingStore, load_or_extract
from cir_bench.index import ExactIndex

from .equivalence import assert_same_rankings


def brute_force(z: np.ndarray, db: np.ndarray, q: np.ndarray, k: int, exclude=None):
    """float64 reference: positions and cosine scores, ties by position."""
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    pos, scores = [], []
    for i in range(len(q)):
        sims = [(float(zn[p].astype(np.float64) @ qn[i].astype(np.float64)), p) for p in db
                if exclude is None or p != exclude[i]]
        sims.sort(key=lambda t: (-t[0], t[1]))  # score desc, then position asc
        pos.append([p for _, p in sims[:k]])
        scores.append([s for s, _ in sims[:k]])
    return np.array(pos), np.array(scores)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_topk_matches_numpy(chunk):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 16)).astype(np.float32)
    db = np.sort(rng.choice(300, 120, replace=False))
    q = rng.normal(size=(25, 16)).astype(np.float32)
    index = ExactIndex(torch.from_numpy(z), db, chunk=chunk)
    pos, scores = index.search(torch.from_numpy(q), 10)
    ref_pos, ref_scores = brute_force(z, db, q, 10)
    # float32 vs float64 scores: equal lists except where items are tied within rounding
    assert_same_rankings(pos.tolist(), scores.tolist(), ref_pos.tolist(), ref_scores.tolist())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_ties_break_by_id_and_self_match_is_excluded():
    # 40 identical vectors: every score ties, so the order must be the position order
    z = torch.ones(40, 4)
    db = np.arange(0, 40, 2)
    index = ExactIndex(z, db)
    pos, _ = index.search(torch.ones(2, 4), 5)
    assert pos.tolist() == [[0, 2, 4, 6, 8]] * 2
    pos, _ = index.search(torch.ones(2, 4), 5, exclude=np.array([0, 4]))
    assert pos.tolist() == [[2, 4, 6, 8, 10], [0, 2, 6, 8, 10]]
    # ties that spill past the top-k window: 30 ties, window is k + 16
    z = torch.cat([torch.ones(30, 4), -torch.ones(10, 4)])
    index = ExactIndex(z, np.arange(40))
    pos, _ = index.search(torch.ones(1, 4), 3, exclude=np.array([1]))
    assert pos.tolist() == [[0, 2, 3]]


def test_self_match_exclusion_against_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(80, 8)).astype(np.float32)
    db = np.arange(80)
    q_pos = rng.choice(80, 10, replace=False)
    index = ExactIndex(torch.from_numpy(z), db)
    pos, scores = index.search(torch.from_numpy(z[q_pos]), 7, exclude=q_pos)
    ref_pos, ref_scores = brute_force(z, db, z[q_pos], 7, exclude=q_pos)
    assert_same_rankings(pos.tolist(), scores.tolist(), ref_pos.tolist(), ref_scores.tolist())
    assert not any(q in row for q, row in zip(q_pos, pos.tolist()))
    kept, _ = index.search(torch.from_numpy(z[q_pos]), 1)
    assert kept[:, 0].tolist() == q_pos.tolist()  # self-match "keep": the query is its own top hit


@pytest.mark.parametrize("chunk", [4, 1024])
def test_one_sync_path_gives_the_plain_answers(chunk):
    """The path CUDA takes by default (queue everything, wait once, redo rows whose tie
    straddles the window), forced on the CPU: the same lists and scores as the plain path,
    with self-matches, ties past the window and a database row that is no query's."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(200, 8)).astype(np.float32)
    z[50:90] = z[50]  # 40 identical rows: every query close to them has ties past k + 16
    db = np.sort(rng.choice(200, 150, replace=False))
    q_pos = np.concatenate([rng.choice(200, 10, replace=False), [50, 51]])
    plain = ExactIndex(torch.from_numpy(z), db, chunk=chunk)
    fused = ExactIndex(torch.from_numpy(z), db, chunk=chunk, one_sync=True)
    assert not plain.one_sync and fused.one_sync  # the default is the device's
    for exclude in (None, q_pos):
        for k in (1, 5, 30):
            a = plain.search(torch.from_numpy(z[q_pos]), k, exclude=exclude)
            b = fused.search(torch.from_numpy(z[q_pos]), k, exclude=exclude)
            # rows redone after the window spilled are a matmul of another shape: scores agree
            # to float32 rounding of a 8-term dot product, not bitwise
            assert b[0].tolist() == a[0].tolist(), (k, exclude is None)
            assert torch.allclose(b[1], a[1], rtol=0, atol=1e-6), (k, exclude is None)
    near = fused.search(torch.from_numpy(z[[50]]), 5, exclude=np.array([50]))[0].tolist()[0]
    assert near == [p for p in db if 50 < p < 90][:5]  # ties by position, the query left out
    # results are copies: a later call does not change an earlier answer held by the caller
    first = fused.search(torch.from_numpy(z[:3]), 4)
    snapshot = first[0].clone()
    fused.search(torch.from_numpy(z[100:103]), 4)
    assert torch.equal(first[0], snapshot)


def test_mask_rows_leaves_other_rows_and_minus_one_alone():
    from cir_bench.index import mask_rows

    scores = torch.arange(12, dtype=torch.float32).view(3, 4)
    mask_rows(scores, np.array([2, -1, 0]))
    assert scores.tolist() == [[0, 1, float("-inf"), 3], [4, 5, 6, 7], [float("-inf"), 9, 10, 11]]


def test_store_cache_roundtrip(tmp_path):
    calls = []

    def extract():
        calls.append(1)
        return torch.randn(5, 3)

    ids = [f"i{i}" for i in range(5)]
    a, hit_a = load_or_extract(tmp_path, "fp1", extract, ids)
    b, hit_b = load_or_extract(tmp_path, "fp1", extract, ids)
    assert (hit_a, hit_b) == (False, True) and len(calls) == 1
    assert torch.equal(a.z, b.z) and isinstance(b, EmbeddingStore)
    load_or_extract(tmp_path, "fp2", extract, ids)
    assert len(calls) == 2


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_faiss_index_matches_exact_index(factory):
    """The FAISS backend (Flat exact, HNSW approximate on a small store) returns the exact
    backend's neighbours, self-match excluded."""
    pytest.importorskip("faiss")
    from cir_bench.index import build_index

    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.normal(size=(500, 16)).astype(np.float32))
    db = np.arange(0, 500, 2)
    exact = build_index("exact", z, db)
    approx = build_index("faiss", z, db, factory=factory, ef_search=256)
    q = z[:20]
    exclude = np.arange(20)
    p1, s1 = exact.search(q, 10, exclude=exclude)
    p2, s2 = approx.search(q, 10, exclude=exclude)
    if factory == "Flat":  # exact up to float summation order
        assert_same_rankings(p1.tolist(), s1.tolist(), p2.tolist(), s2.tolist())
    else:  # approximate: most neighbours found, with the exact scores
        assert_same_rankings(p1.tolist(), s1.tolist(), p2.tolist(), s2.tolist(), min_identical=0.8, min_overlap=0.8)
    assert not any(int(e) in row for e, row in zip(exclude, p2.tolist()))


def test_unknown_index_backend_names_the_choices():
    from cir_bench.index import build_index
    from cir_bench.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="exact, faiss"):
        build_index("annoy", torch.zeros(3, 2), np.arange(3))


def test_a_feature_without_its_extra_names_the_extra(monkeypatch, capsys):
    """FAISS and the CoIR baselines are extras of the package ([faiss], [baselines]): without
    one, the feature stops with an error naming the extra to install, not an ImportError deep
    in a stack; the CLI prints it as a user error."""
    import sys

    import numpy as np
    import torch

    from cir_bench.index.faiss_index import FaissIndex
    from cir_bench.registry import MissingExtraError

    monkeypatch.setitem(sys.modules, "faiss", None)  # an import of faiss now fails
    with pytest.raises(MissingExtraError) as err:
        FaissIndex(torch.randn(8, 4), np.arange(8))
    assert err.value.extra == "faiss" and "pip install 'cir-bench[faiss]'" in str(err.value)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    from cir_bench_baselines.clip_common import tokenizer

    with pytest.raises(MissingExtraError) as err:
        tokenizer()
    assert err.value.extra == "baselines" and err.value.module == "open_clip"
