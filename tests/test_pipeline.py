"""End to end on SynthArt tiny: files, cache reuse, metrics recomputed from the files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cir_bench import pipeline
import cir_bench.pipeline.steps  # noqa: F401  (patched below)
from cir_bench.cli import main
from cir_bench.config import load_config
from cir_bench.results import RESULT_FILES

from .conftest import tiny_overrides


def test_training_reports_per_property_accuracy(tiny_trained):
    final = tiny_trained.history[-1]
    for prop in ("style", "shape", "color"):
        assert 0.0 <= final[f"train_acc_{prop}"] <= 1.0 and 0.0 <= final[f"val_acc_{prop}"] <= 1.0
    assert len(tiny_trained.history) == 2


def test_run_writes_files_and_second_run_reuses_cache(cache_dir, tmp_path, tiny_trained, monkeypatch, capsys):
    out1 = tmp_path / "run1"
    assert main(["run", "--no-progress", *sum((["--set", o] for o in tiny_overrides(cache_dir, out1)), [])]) == 0
    printed = capsys.readouterr().out
    assert "precision_at_10" in printed and "knn" in printed and "random" in printed
    for name in RESULT_FILES:
        assert (out1 / name).exists()
    manifest = json.loads((out1 / "manifest.json").read_text())
    assert manifest["checkpoint"]["reused"] is True  # the session fixture trained this config
    assert manifest["seed"] == 0 and manifest["dataset"]["fingerprint"]
    assert manifest["packages"]["torch"] and "revision" in manifest["git"]
    assert manifest["policies"]["self_match"] == "exclude"
    assert manifest["torch_threads"] >= 1 and manifest["cpu_capability"]  # float results depend on them

    # second run: no training, no extraction
    def boom(*a, **k):
        raise AssertionError("should have been served from the cache")

    monkeypatch.setattr(pipeline.steps, "train_model", boom)
    monkeypatch.setattr(pipeline.steps, "extract_embeddings", boom)
    out2 = pipeline.run(load_config(None, tiny_overrides(cache_dir, tmp_path / "run2")), progress=False,
                        log=lambda *_: None)
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["checkpoint"]["reused"] and m2["embeddings"]["reused"]
    a = pd.read_csv(out1 / "metrics.csv")
    b = pd.read_csv(out2 / "metrics.csv")
    pd.testing.assert_frame_equal(a.drop(columns=["ms_per_query", "setup_s"]), b.drop(columns=["ms_per_query", "setup_s"]))


def test_metrics_recomputable_from_files_alone(cache_dir, tmp_path):
    out = pipeline.run(load_config(None, tiny_overrides(cache_dir, tmp_path / "r")), progress=False,
                       log=lambda *_: None)
    items = pd.read_parquet(out / "items.parquet").set_index("id")
    results = pd.read_parquet(out / "results.parquet")
    metrics = pd.read_csv(out / "metrics.csv").set_index("method")
    from cir_bench.config import FRONTIER_BETAS, FRONTIER_LAMBDAS, FRONTIER_STUDENT_LAMBDAS

    methods = {"random", "knn", "filtered_knn", "oracle_filtered_knn", "backward[lam=0]", "backward[lam=0.005]",
               "student", *(f"backward[lam={v:g}]" for v in FRONTIER_LAMBDAS),
               *(f"student[lam={v:g}]" for v in FRONTIER_STUDENT_LAMBDAS),
               *(f"soft_filtered_knn[beta={v:g}]" for v in FRONTIER_BETAS)}
    assert set(results["method"]) == methods and set(results["query_set"]) == {"style", "style+shape"}
    assert len(results) == len(methods) * 40 * 2
    metrics = metrics.reset_index().set_index(["query_set", "method"])
    for (qset, method), rows in results.groupby(["query_set", "method"]):
        prec, mts = [], []
        for row in rows.itertuples():
            cond = json.loads(row.conditions)
            ranked = list(row.ranked_ids)[:10]
            assert row.query_id not in ranked  # self-match excluded
            assert all(items.loc[r, "split"] == "test" for r in ranked)
            prec.append(np.mean([all(items.loc[r, p] == v for p, v in cond.items()) for r in ranked]))
            tq = set(items.loc[row.query_id, "tags"])
            mts.append(np.mean([len(tq & set(items.loc[r, "tags"])) / len(tq | set(items.loc[r, "tags"]))
                                for r in ranked]))
        assert metrics.loc[(qset, method), "precision_at_10"] == pytest.approx(np.mean(prec))
        assert metrics.loc[(qset, method), "map_at_10_paper"] == pytest.approx(np.mean(prec))
        assert metrics.loc[(qset, method), "mts_at_10"] == pytest.approx(np.mean(mts))
    for col in ("ap_at_10_R", "ap_at_10_minRk", "ap_at_10_hits", "hit_at_10", "recall_at_10", "context_at_10",
                "twin_hit_at_10", "n_twin_queries", "ms_per_query"):
        assert col in metrics.columns
    # knn keeps context far better than chance; the oracle filter is exact
    assert metrics.loc[("style", "knn"), "context_at_10"] > metrics.loc[("style", "random"), "context_at_10"]
    assert metrics.loc[("style", "oracle_filtered_knn"), "precision_at_10"] == 1.0
    assert metrics.loc[("style", "backward[lam=0]"), "mean_iterations"] >= 0
    assert 0 <= metrics.loc[("style", "student"), "retrieved_similarity_at_10"] <= 1


def test_random_method_is_seeded(cache_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(cache_dir, tmp_path / "a") + ["eval.methods=[random]",
                                                                        "queries.sets=[[style]]"])
    a = pd.read_parquet(pipeline.run(cfg, progress=False, log=lambda *_: None) / "results.parquet")
    cfg.out = str(tmp_path / "b")
    b = pd.read_parquet(pipeline.run(cfg, progress=False, log=lambda *_: None) / "results.parquet")
    assert a["ranked_ids"].map(list).tolist() == b["ranked_ids"].map(list).tolist()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet42"], "unknown dataset 'imagenet42'; available: apy, csv, cub, domains, emoji, synthart, wikiart"),
        (["--set", "model.backbone=resnet9000"], "unknown backbone 'resnet9000'"),
        (["--methods", "teleport"], "unknown search method 'teleport'"),
        (["--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
        (["--set", "model.pretrained=true", "--set", "model.backbone=resnet50"], "resnet50-0676ba61.pth"),
    ],
)
def test_cli_errors_are_clear(cache_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("CIR_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = sum((["--set", o] for o in tiny_overrides(cache_dir, tmp_path / "o")), [])
    code = main(["run", "--no-progress", *base, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_list_command(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "synthart" in out and "small_cnn" in out and "knn" in out and "precision_at_k" in out


def test_smaller_step_commands(cache_dir, tmp_path, capsys):
    base = sum((["--set", o] for o in tiny_overrides(cache_dir)), [])
    assert main(["train", "--no-progress", *base]) == 0
    assert '"checkpoint"' in capsys.readouterr().out
    assert main(["embed", "--no-progress", *base]) == 0
    assert '"fingerprint"' in capsys.readouterr().out
    out = tmp_path / "q.parquet"
    assert main(["queries", *base, "--out", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert set(frame["query_set"]) == {"style", "style+shape"} and len(frame) == 80


def test_training_is_deterministic_so_cache_keys_are_content_based(tmp_path):
    import torch

    from cir_bench.pipeline import load_dataset, train_or_load
    from cir_bench.paths import file_sha256

    hashes = []
    for run in ("a", "b"):
        cfg = load_config(None, ["dataset.options={preset: tiny}", f"cache_dir={tmp_path / run}", "train.epochs=1",
                                 "device=cpu"])
        trained = train_or_load(cfg, load_dataset(cfg), torch.device("cpu"), progress=False)
        hashes.append(file_sha256(trained.checkpoint))
    assert hashes[0] == hashes[1]  # same seed, same data: byte-identical checkpoints


def test_seeds_train_once_each_on_the_same_queries_and_one_report_pools_them(cache_dir, tmp_path):
    from tests.test_report import html_tables

    out = tmp_path / "seeds"
    overrides = [o for o in tiny_overrides(cache_dir, out)]
    args = ["run", "--no-progress", "--seeds", "0,1", "--methods", "knn,backward",
            *sum((["--set", o] for o in overrides), [])]
    assert main(args) == 0
    manifests = [json.loads((out / f"seed-{s}" / "manifest.json").read_text()) for s in (0, 1)]
    assert [m["seed"] for m in manifests] == [0, 1]
    assert manifests[0]["checkpoint"]["sha256"] != manifests[1]["checkpoint"]["sha256"]  # trained twice
    queries = [pd.read_parquet(out / f"seed-{s}" / "results.parquet").query("method == 'knn'")["query_id"].tolist()
               for s in (0, 1)]
    assert queries[0] == queries[1]  # the seeds differ in training only
    pooled = [t for t in html_tables(out / "report.html") if t["caption"].startswith("Pooled")]
    assert pooled and any("(n=2)" in cell for t in pooled for row in t["rows"] for cell in row)
    assert main(["run", "--seeds", "0", "--set", f"cache_dir={cache_dir}"]) == 2  # one seed is not a pool
    assert main(["run", "--seeds", "0,x"]) == 2
