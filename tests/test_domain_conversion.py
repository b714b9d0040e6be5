"""The domain-conversion protocol: its metrics against hand-computed values and a plain
re-implementation, the ``domains`` loader on replicas of the published file lists, and a run
on one whose numbers a plain computation from the run's own files reproduces."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cir_bench.cli import main
from cir_bench.data.files import DatasetLayoutError
from cir_bench.metrics import dc_map, dc_precision_at_k, dc_recall_at_k, trapezoidal_ap
from tests import replicas


def plain_ap(correct_row) -> float:
    """The revisited Oxford/Paris ``compute_ap``, written out as a loop."""
    ranks = [i for i, c in enumerate(correct_row) if c]
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * (1.0 / len(ranks)) / 2.0
    return ap


def plain_precision_recall(correct, k):
    precision, recall = [], []
    for row in correct:
        total, top = sum(row), sum(row[:k])
        precision.append(top / min(total, k) if total else 0.0)
        recall.append(top / total if total else 0.0)
    return np.array(precision), np.array(recall)


def test_trapezoidal_ap_by_hand():
    # correct at ranks 1 and 3 (0-based 0 and 2): (1 + 1)/2 and (1/2 + 2/3)/2, over R = 2
    assert trapezoidal_ap(np.array([1, 0, 1, 0])) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    # a third correct item the ranking never reaches counts as not retrieved
    assert trapezoidal_ap(np.array([1, 0, 1, 0]), n_correct=3) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 3)
    assert trapezoidal_ap(np.zeros(4)) == 0.0
    with pytest.raises(ValueError, match="fewer than the 2 correct"):
        trapezoidal_ap(np.array([1, 1, 0]), n_correct=1)


def test_precision_divides_by_min_of_correct_and_k():
    correct = np.array([[0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert dc_precision_at_k(correct, 4).tolist() == [1.0, 0.75, 0.0]  # 1/min(1,4); 3/min(5,4)
    assert dc_recall_at_k(correct, 4).tolist() == [1.0, 0.6, 0.0]
    assert dc_precision_at_k(correct, 4, n_correct=np.array([2, 5, 0])).tolist() == [0.5, 0.75, 0.0]


def test_the_metrics_agree_with_a_plain_reimplementation():
    rng = np.random.default_rng(0)
    correct = (rng.uniform(size=(300, 80)) < rng.uniform(0.0, 0.3, size=(300, 1))).astype(int)
    assert np.allclose(dc_map(correct), [plain_ap(row) for row in correct.tolist()], atol=1e-12)
    for k in (1, 5, 50):
        precision, recall = plain_precision_recall(correct.tolist(), k)
        assert np.allclose(dc_precision_at_k(correct, k), precision, atol=1e-12)
        assert np.allclose(dc_recall_at_k(correct, k), recall, atol=1e-12)


# -- the domains loader ------------------------------------------------------------------------
def test_separate_lists_give_query_database_and_a_carved_train_split(tmp_path):
    from cir_bench.data import get_dataset

    root = replicas.domains(tmp_path / "dn")
    ds = get_dataset("domains", str(root), {"train_fraction": 0.4, "seed": 1})
    assert [p.name for p in ds.properties] == ["domain", "class"]
    assert ds.class_key == "class" and ds.domain_property == "domain"
    splits = pd.Series([it.split for it in ds.items]).value_counts().to_dict()
    assert splits["query"] == 9  # every query of the list stays a query
    assert splits["database"] + splits["train"] == 45 and splits["train"] > 0
    assert "train_fraction 0.4" in ds.report["train"]
    again = get_dataset("domains", str(root), {"train_fraction": 0.4, "seed": 1})
    assert [it.split for it in again.items] == [it.split for it in ds.items]  # seeded


def test_a_full_list_is_both_the_queries_and_the_database(tmp_path):
    from cir_bench.data import get_dataset

    root = replicas.domains(tmp_path / "full", layout="full", train_list=True)
    ds = get_dataset("domains", str(root), {})
    assert ds.full_list
    assert ds.split_indices("query").tolist() == ds.split_indices("database").tolist()
    assert len(ds.split_indices("query")) == 54 and len(ds.split_indices("train")) == 54
    assert "train_files.csv: 54 images" in ds.report["train"]


@pytest.mark.parametrize("content, message", [
    ("imgs/a.jpg photo\n", "line 1 has 2 fields"),
    ("../outside.jpg photo cat\n", "must be relative to the image folder and stay inside it"),
    ("/etc/passwd photo cat\n", "must be relative to the image folder"),
])
def test_a_malformed_list_is_named(tmp_path, content, message):
    from cir_bench.data import get_dataset

    (tmp_path / "full_files.csv").write_text(content)
    with pytest.raises(DatasetLayoutError, match=message):
        get_dataset("domains", str(tmp_path), {})


def test_freedoms_layout_lists_in_a_subfolder_paths_from_its_parent(tmp_path):
    """FreeDom's lists sit in data/<set>/ and name paths from data/ ("ltll/New/..."), some
    with spaces or commas in the file name."""
    from cir_bench.data import get_dataset

    data = tmp_path / "data"
    lines = []
    for i, (domain, klass) in enumerate([("New", "Big Ben"), ("Old", "Big Ben"), ("New", "Notredame"),
                                         ("Old", "Notredame")] * 2):
        rel = f"ltll/{domain}/images/{klass.replace(' ', '')}/photo {i}, x.jpg"
        replicas.write_image(data / rel, replicas.PALETTE[i % 3], seed=i)
        lines.append(f"{rel} {domain} {klass.replace(' ', '')}")
    (data / "ltll").mkdir(exist_ok=True)
    (data / "ltll" / "full_files.csv").write_text("\n".join(lines) + "\n")
    ds = get_dataset("domains", str(data / "ltll"), {"images": "..", "train_fraction": 0.25})
    assert len(ds) == 8 and ds.property("domain").classes == ("New", "Old")
    assert ds.load_image(ds.index_of("ltll/New/images/BigBen/photo 0, x.jpg")).size == (48, 40)
    with pytest.raises(DatasetLayoutError, match=r"from the parent folder .*dataset.options.images=\.\."):
        get_dataset("domains", str(data / "ltll"), {})  # without images=.., the paths do not resolve


def test_without_lists_the_error_names_the_files_it_wants(tmp_path):
    from cir_bench.data import get_dataset

    with pytest.raises(DatasetLayoutError, match="query_files.csv \\+ database_files.csv, or full_files.csv"):
        get_dataset("domains", str(tmp_path), {})


def test_an_image_in_two_lists_is_refused(tmp_path):
    from cir_bench.data import get_dataset

    root = replicas.domains(tmp_path / "dn")
    first = (root / "query_files.csv").read_text().splitlines()[0]
    with open(root / "database_files.csv", "a") as f:
        f.write(first + "\n")
    with pytest.raises(DatasetLayoutError, match="in both the query and the database list"):
        get_dataset("domains", str(root), {})


# -- a run on the replica ----------------------------------------------------------------------
def test_a_run_on_the_published_layout_matches_a_plain_computation(tmp_path, cache_dir):
    """``cir-bench run --dataset domains --root R``: the per-query mAP, P@k and R@k of kNN
    equal a plain computation from the run's embeddings, labels and queries (full ranking by
    cosine, ties by item id, FreeDom's formulas)."""
    from cir_bench.config import load_config
    from cir_bench.pipeline import prepare

    root = replicas.domains(tmp_path / "dn", per_pair=8)
    out = tmp_path / "run"
    args = ["--dataset", "domains", "--root", str(root), "--cache-dir", str(cache_dir), "--device", "cpu",
            "--set", "train.epochs=2", "--set", "model.input_size=32", "--set", "queries.n_queries=9",
            "--set", "queries.min_relevant=2", "--set", "eval.k=5"]
    assert main(["run", "--no-progress", "--out", str(out), "--methods", "knn,filtered_knn,backward", *args]) == 0
    results = pd.read_parquet(out / "results.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["protocol"] == {"class": "class", "domain": "domain"}
    assert manifest["config"]["queries"]["query_split"] == "query"  # the dataset's own default
    for col in ("metric_dc_map", "metric_dc_precision_at_5", "metric_dc_recall_at_5"):
        assert results[col].notna().all()
    report = (out / "report.md").read_text()
    assert "domain: domain conversion, mAP over the whole database per source → target pair" in report
    assert "photo→sketch" in report and "knn: domain-conversion mAP, source (rows) → target" in report
    # the pair table's cells are the means of the per-query values
    from cir_bench.report.inputs import read_run
    from cir_bench.report.tables import domain_pairs

    tables = domain_pairs(read_run(out), "domain")
    knn_rows = results[results["method"] == "knn"]
    source = knn_rows["query_id"].str.split("/").str[1]
    for (a, b), g in knn_rows.groupby([source, knn_rows["cond_domain"]]):
        value = tables["pairs"].set_index("method").loc["knn", f"{a}→{b}"]
        assert value == pytest.approx(g["metric_dc_map"].mean(), abs=1e-4)
    matrix = tables["matrix knn"].set_index("domain: source \\ target")
    assert matrix.loc["average", "average"] == pytest.approx(tables["pairs"].set_index("method").loc["knn", "average"],
                                                             abs=1e-4)

    cfg = load_config(None, [f"dataset.name=domains", f"dataset.root={root}", f"cache_dir={cache_dir}",
                             "device=cpu", "train.epochs=2", "model.input_size=32", "queries.query_split=query",
                             "queries.database_split=database"])
    prepared = prepare(cfg, progress=False)
    ds, z = prepared.dataset, prepared.store.z.double().numpy()
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    database = ds.split_indices("database")
    labels = {p: ds.labels(p) for p in ("domain", "class")}
    domains = ds.property("domain").classes
    knn = results[results["method"] == "knn"]
    assert len(knn) == 9
    for _, row in knn.iterrows():
        q = ds.index_of(row["query_id"])
        target = domains.index(row["cond_domain"])
        pool = [p for p in database if p != q]
        sims = {p: float(z[p] @ z[q]) for p in pool}
        ranked = sorted(pool, key=lambda p: (-sims[p], ds.items[p].id))
        is_correct = {p: int(labels["class"][p] == labels["class"][q] and labels["domain"][p] == target)
                      for p in pool}
        # float32 sums in another order may swap items whose cosines differ by less than 1e-5:
        # the run's value must lie between the best and the worst order of such near-ties
        best, worst = _tie_orders(ranked, sims, is_correct, 1e-5)
        top = [ds.index_of(i) for i in row["ranked_ids"]]
        assert min(sims[p] for p in top) >= sims[ranked[4]] - 1e-5
        lo, hi = sorted((plain_ap(worst), plain_ap(best)))
        assert lo - 1e-9 <= row["metric_dc_map"] <= hi + 1e-9
        for metric, index in (("dc_precision_at_5", 0), ("dc_recall_at_5", 1)):
            values = sorted(plain_precision_recall([order], 5)[index][0] for order in (worst, best))
            assert values[0] - 1e-9 <= row[f"metric_{metric}"] <= values[1] + 1e-9


def _tie_orders(ranked, sims, is_correct, tol):
    """The correct/incorrect sequence with each block of near-tied items ordered correct-first
    (best) and correct-last (worst)."""
    blocks, current = [], [ranked[0]]
    for p in ranked[1:]:
        if sims[current[0]] - sims[p] < tol:
            current.append(p)
        else:
            blocks.append(current)
            current = [p]
    blocks.append(current)
    best = [c for b in blocks for c in sorted((is_correct[p] for p in b), reverse=True)]
    worst = [c for b in blocks for c in sorted(is_correct[p] for p in b)]
    return best, worst


def test_compare_runs_the_training_free_and_inversion_baselines_on_the_protocol(tmp_path, cache_dir, tiny_weights,
                                                                                no_network):
    """``cir-bench compare --dataset domains``: FreeDom and BASIC (the protocol's own methods),
    Text x Image, SEARLE's OTI and LinCIR rank the database with every query; FreeDom's text is the
    bare target domain, as its authors run the protocol."""
    root = replicas.domains(tmp_path / "dn", per_pair=8)
    out = tmp_path / "cmp"
    names = ["freedom", "basic", "clip-product", "searle-oti", "lincir"]
    args = ["--dataset", "domains", "--root", str(root), "--cache-dir", str(cache_dir), "--device", "cpu",
            "--set", "train.epochs=2", "--set", "model.input_size=32", "--set", "queries.n_queries=9",
            "--set", "queries.min_relevant=2", "--set", "eval.k=5", "--weights-dir", str(tiny_weights),
            "--baselines", ",".join(names), "--templates", "T1", "--set", "baselines.options.searle-oti={steps: 3}"]
    assert main(["compare", "--no-progress", "--out", str(out), *args]) == 0
    results = pd.read_parquet(out / "results.parquet")
    for label in ["freedom", "basic", "clip-product", "searle-oti[T1]", "lincir[T1]"]:
        rows = results[results["method"] == label]
        assert len(rows) == 9 and rows["metric_dc_map"].notna().all(), label
    freedom = results[results["method"] == "freedom"]
    assert (freedom["prompt"] == freedom["cond_domain"]).all()  # "sketch", not a sentence
    assert all(p.endswith(" style") for p in results[results["method"] == "lincir[T1]"]["prompt"])
    table = (out / "comparison.md").read_text()
    assert all(f"| {name} † |" in table for name in names)
