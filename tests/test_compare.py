"""`cir-bench compare` / `report` / `check-weights` end to end on SynthArt with tiny-weight adapters."""
from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("open_clip")

from cir_bench.cli import main  # noqa: E402

from .conftest import tiny_overrides  # noqa: E402


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def _args(cache_dir, out, weights_dir, extra=()):
    args = ["compare", "--no-progress", "--weights-dir", str(weights_dir), "--out", str(out)]
    # SEARLE-OTI's 350 steps per image are its cost, not what these tests check
    for o in [*tiny_overrides(cache_dir), "baselines.options.searle-oti={steps: 3}"]:
        args += ["--set", o]
    return args + list(extra)


@pytest.fixture(scope="module")
def tiny_compare(cache_dir, tiny_trained, weights, tmp_path_factory, no_network):
    out = tmp_path_factory.mktemp("compare") / "tiny"
    assert main(_args(cache_dir, out, weights)) == 0
    return out


def test_compare_runs_every_baseline_with_tiny_weights_labelled(tiny_compare):
    metrics = pd.read_csv(tiny_compare / "metrics.csv")
    labels = set(metrics["method"])
    for name in ("clip4cir", "pic2word", "searle", "searle-xl", "searle-oti", "lincir", "covr"):
        assert {f"{name}[T1]", f"{name}[T2]", f"{name}[T3]"} <= labels
    assert {"clip-image", "clip-text", "clip-sum", "clip-product", "freedom", "basic", "student", "knn", "random",
            "filtered_knn"} <= labels
    assert metrics["precision_at_10"].between(0, 1).all()
    table = (tiny_compare / "comparison.md").read_text()
    assert "| searle † |" in table and "not the authors' ViT-B-32" in table  # tiny weights are labelled
    for name in ("freedom", "clip-product", "basic", "searle-oti", "lincir"):  # every new adapter is labelled too
        assert f"| {name} † |" in table, name
    assert "## Template spread" in table and "mean ± std" in table
    wide = pd.read_csv(tiny_compare / "comparison.csv", index_col=0)
    assert wide.loc["searle", "status"].startswith("computed with non-author weights")
    assert {"synthart:style", "synthart:style+shape", "average"} <= set(wide.columns)
    # the headline is the T1 row, recomputed here from metrics.csv
    t1 = metrics[metrics["method"] == "searle[T1]"].set_index("query_set")["precision_at_10"]
    assert wide.loc["searle", "synthart:style"] == pytest.approx(t1["style"])
    assert wide.loc["searle", "average"] == pytest.approx(t1.mean())


def test_compare_stores_the_exact_prompts_and_weights_provenance(tiny_compare):
    results = pd.read_parquet(tiny_compare / "results.parquet")
    searle = results[(results["method"] == "searle[T2]") & (results["query_set"] == "style")]
    assert all(p.startswith("a photo of $ that make it in ") and p.endswith(" style") for p in searle["prompt"])
    both = results[(results["method"] == "pic2word[T1]") & (results["query_set"] == "style+shape")]
    assert all(p.startswith("a photo of * , is in ") and " style and is a" in p for p in both["prompt"])
    manifest = json.loads((tiny_compare / "manifest.json").read_text())
    setup = manifest["methods"]["clip4cir[T1]"]["setup"]
    assert all(len(v["sha256"]) == 64 for v in setup["weights"].values())
    assert setup["describe"]["preprocess"].startswith("targetpad1.25")


def test_second_compare_reuses_the_cached_galleries(tiny_compare, cache_dir, weights, tmp_path, monkeypatch):
    """Weights root from the config key this time (baselines.weights_dir), not --weights-dir."""
    monkeypatch.delenv("CIR_BENCH_WEIGHTS", raising=False)
    out = tmp_path / "again"
    args = [a for a in _args(cache_dir, out, weights) if a not in ("--weights-dir", str(weights))]
    args += ["--set", f"baselines.weights_dir={weights}", "--baselines", "searle", "--templates", "T1"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["searle[T1]"]["setup"]["gallery_reused"] is True
    before = pd.read_csv(tiny_compare / "metrics.csv").set_index(["query_set", "method"])
    after = pd.read_csv(out / "metrics.csv").set_index(["query_set", "method"])
    assert after.loc[("style", "searle[T1]"), "precision_at_10"] == before.loc[("style", "searle[T1]"),
                                                                                 "precision_at_10"]


def test_compare_with_empty_weights_dir_lists_missing_rows(cache_dir, tiny_trained, tmp_path, no_network, capsys):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    out = tmp_path / "cmp"
    assert main(_args(cache_dir, out, empty)) == 0
    table = (out / "comparison.md").read_text()
    assert f"| searle | weights missing: {empty.resolve() / 'searle' / 'SEARLE_ViT-B32.pt'}" in table
    assert "| student |" in table and "backward[lam=0.005]" in table  # the other methods still ran
    for name, first in (("freedom", "clip/ViT-L-14.pt"), ("basic", "clip/ViT-L-14.pt"),
                        ("searle-oti", "clip/ViT-B-32.pt"), ("lincir", "lincir/lincir_large.pt")):
        assert f"| {name} | weights missing: {empty.resolve() / first}" in table, name
    assert "freedom/open_image_v7_class_names.csv" in table and "basic/dataset_1_sd_clip.pkl.npy" in table
    wide = pd.read_csv(out / "comparison.csv", index_col=0)
    assert wide.loc["pic2word", "status"].startswith("weights missing:")
    assert pd.isna(wide.loc["pic2word", "average"])  # never numbers for a missing baseline


def test_report_merges_runs_and_check_weights_lists_files(tiny_compare, weights, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(tiny_compare), "--out", str(out)]) == 0
    assert (out / "comparison.md").read_text() == (tiny_compare / "comparison.md").read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["check-weights", "--weights-dir", str(weights)]) == 0
    text = capsys.readouterr().out
    assert "searle: ready" in text and "sha256 " in text and "13 of 13 baselines ready" in text


@pytest.mark.slow
def test_compare_on_the_default_preset(cache_dir, weights, tmp_path, no_network):
    """SynthArt default (2,794 images) with a 1-epoch model: the full compare path at size."""
    out = tmp_path / "default"
    args = ["compare", "--no-progress", "--weights-dir", str(weights), "--out", str(out),
            "--set", f"cache_dir={cache_dir}", "--set", "train.epochs=1", "--set", "device=cpu",
            "--set", "student.epochs=2", "--set", "queries.n_queries=100",
            "--baselines", "searle,clip4cir,clip-sum", "--templates", "T1,T3"]
    assert main(args) == 0
    wide = pd.read_csv(out / "comparison.csv", index_col=0)
    assert {"synthart:style", "synthart:style+shape", "average"} <= set(wide.columns)
    assert wide.loc[["searle", "clip4cir", "clip-sum", "student"], "average"].notna().all()


@pytest.mark.parametrize("content", [b"<!DOCTYPE html><html>Google Drive - Virus scan warning</html>" * 40,
                                     b"\x80" + b"\x00" * 99, b"PK\x03\x04" + b"\x00" * 4000])
def test_damaged_weights_are_refused_by_check_weights_and_before_compare(weights, tmp_path, capsys, content):
    """An HTML page, a 100-byte file or a broken archive under a checkpoint's name: check-weights
    says DAMAGED (exit 1), and compare stops before any pipeline work, naming the file."""
    import shutil
    import time

    root = tmp_path / "weights"
    shutil.copytree(weights, root)
    bad = root / "pic2word" / "pic2word_model.pt"
    bad.write_bytes(content)
    assert main(["check-weights", "--weights-dir", str(root), "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert "pic2word: DAMAGED" in out and f"damaged  {bad.resolve()}" in out and "searle: ready" in out
    t0 = time.perf_counter()
    assert main(["compare", "--no-progress", "--weights-dir", str(root), "--out", str(tmp_path / "never"),
                 "--set", "dataset.options={preset: tiny}", "--set", f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "get it again from" in err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "never").exists()
    assert not (tmp_path / "cache" / "checkpoints").exists()  # no training started


def test_weights_with_wrong_keys_fail_compare_before_training(weights, tmp_path, capsys):
    """A sound archive that holds the wrong dictionary: every adapter is built from its weights
    before the pipeline starts, so compare stops before training, naming the file."""
    import shutil

    import torch

    root = tmp_path / "weights"
    shutil.copytree(weights, root)
    bad = root / "pic2word" / "pic2word_model.pt"
    torch.save({"epoch": 3, "not_the_state_dict": torch.zeros(2000)}, bad)
    assert main(["check-weights", "--weights-dir", str(root), "--no-hash", "--no-load", "--baselines",
                 "pic2word"]) == 0  # the file looks like a checkpoint...
    assert main(["check-weights", "--weights-dir", str(root), "--no-hash", "--baselines", "pic2word"]) == 1
    out = capsys.readouterr().out
    assert "pic2word: DAMAGED" in out and "found keys" in out  # ...but is not the authors' checkpoint
    assert main(["compare", "--no-progress", "--weights-dir", str(root), "--out", str(tmp_path / "never"),
                 "--baselines", "pic2word,searle", "--set", "dataset.options={preset: tiny}",
                 "--set", f"cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "found keys" in err
    assert not (tmp_path / "cache" / "checkpoints").exists()  # no training started


def test_report_carries_confidence_intervals_and_paired_tests(tiny_compare, tmp_path):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_compare), "--out", str(out)]) == 0
    sig = pd.read_csv(out / "significance.csv")
    assert {"mean", "ci_low", "ci_high", "reference", "difference", "p_value", "p_holm", "significant"} <= set(sig)
    assert (sig["ci_low"] <= sig["mean"] + 1e-12).all() and (sig["mean"] <= sig["ci_high"] + 1e-12).all()
    assert set(sig["reference"].dropna()) == {"backward[lam=0]", "backward[lam=0.005]"}
    text = (out / "comparison.md").read_text()
    assert "Uncertainty and significance" in text and "[95 % CI]" in text
    # the cost-quality plot: OTI beside φ, the teacher beside its student, the others as points
    assert (out / "report_figures" / "run0_cost_quality.png").is_file()
    page = (out / "report.html").read_text()
    assert "Cost against quality" in page and "SEARLE: OTI" not in page  # the legend is in the image
    from cir_bench.report.inputs import read_run
    from cir_bench.report.tables import cost_points, estimates

    run = read_run(tiny_compare)
    points = cost_points(run.metrics, estimates(run, resamples=100), ["precision_at_10"])
    style = points[points["query_set"] == "style"].set_index("method")
    assert {"searle-oti[T1]", "searle[T1]", "student", "backward[lam=0.005]", "freedom"} <= set(style.index)
    assert not any(m.endswith(("[T2]", "[T3]")) for m in style.index)  # template baselines by their T1 row
    metrics = run.metrics.set_index(["query_set", "method"])
    assert style.loc["searle-oti[T1]", "ms"] == metrics.loc[("style", "searle-oti[T1]"), "ms_per_query"]
    assert (style["y_low"] <= style["y"]).all() and (style["y"] <= style["y_high"]).all()
