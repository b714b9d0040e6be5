"""report.html / report.md: every metric cell a mean with its interval, significance marks
that mean something, the frontier, the sections of every kind of input, clear refusals, and
the page itself in a real (headless) Chromium with no request leaving the machine."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cir_bench.cli import main
from cir_bench.report import ReportOptions, classify, write_html_report
from cir_bench.report.frontier import pareto_mask, points, verdict
from cir_bench.report.inputs import read_run
from cir_bench.report.tables import estimates
from cir_bench.results import write_run

from .conftest import tiny_overrides

CI_CELL = re.compile(r"^-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]( \(n=\d+\))?$")  # n: fewer queries than the set
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Tables(HTMLParser):
    """(caption, header, rows) of every <table> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self._in: str | None = None
        self._cell: list[str] = []
        self._row: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "figcaption":
            self._in, self._cell = "caption", []
        elif tag == "table":
            self.tables.append({"caption": getattr(self, "_caption", ""), "header": [], "rows": []})
        elif tag in ("td", "th"):
            self._in, self._cell = tag, []
        elif tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "figcaption" and self._in == "caption":
            self._caption, self._in = "".join(self._cell).strip(), None
        elif tag in ("td", "th") and self._in == tag:
            self._row.append("".join(self._cell).strip())
            self._in = None
        elif tag == "tr" and self.tables and self._row:
            t = self.tables[-1]
            if not t["header"]:
                t["header"] = self._row
            else:
                t["rows"].append(self._row)

    def handle_data(self, data):
        if self._in:
            self._cell.append(data)


def html_tables(path: Path) -> list[dict]:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.tables


def fake_run(path: Path, per_method: dict[str, np.ndarray], seed: int = 0, lam: float = 0.005,
             prop: str = "style", label: str = "a", id_prefix: str = "") -> Path:
    """A run directory written with the suite's own writer from hand-made per-query values
    (precision, context): methods named as the pipeline names them; ``prop`` (also the query
    set's name), ``label`` and ``id_prefix`` are what a user's CSV could hold."""
    n = len(next(iter(per_method.values())))
    items = pd.DataFrame({"id": [f"{id_prefix}q{i:03d}" for i in range(n)] + [f"{id_prefix}d{i:03d}" for i in range(20)],
                          "split": ["test"] * (n + 20), prop: [label, "b"] * ((n + 20) // 2)})
    rows, metrics = [], []
    for method, values in per_method.items():
        family = method.split("[")[0]
        params = {"lam": float(method.split("=")[1].rstrip("]"))} if family == "backward" else {}
        for i, v in enumerate(values):
            rows.append({"query_set": prop, "method": method, "query_id": f"{id_prefix}q{i:03d}",
                         "conditions": json.dumps({prop: label}),
                         "ranked_ids": [f"{id_prefix}d{j:03d}" for j in range(10)],
                         "scores": [1.0 - j / 10 for j in range(10)], "metric_precision_at_10": float(v),
                         "metric_context_at_10": float(1 - v), "metric_mts_at_10": float(1 - v) / 2,
                         "metric_hit_context_at_10": float(1 - v)})
        metrics.append({"query_set": prop, "method": method, "name": family, "n_queries": n,
                        "precision_at_10": float(np.mean(values)), "context_at_10": float(1 - np.mean(values)),
                        "ms_per_query": 0.1, "params": json.dumps(params)})
    manifest = {"created": "2026-11-27T00:00:00+00:00", "seed": seed,
                "config": {"seed": seed, "out": str(path), "search": {"lam": lam}, "eval": {"k": 10},
                           "dataset": {"name": "not-installed", "options": {}}},
                "dataset": {"name": f"hand-made {label}", "fingerprint": "f" * 16, "n_items": len(items)}}
    write_run(path, pd.DataFrame(rows), pd.DataFrame(metrics), items, manifest)
    return path


# ------------------------------------------------------------------ hand-checkable cases

def test_significance_marks_identical_methods_never_and_a_constant_shift_always(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.8, 60).round(1)
    run = fake_run(tmp_path / "run", {"backward[lam=0]": base, "backward[lam=0.005]": base[::-1].copy(),
                                      "same": base.copy(), "shifted": base + 0.1})
    write_html_report(classify([run]), tmp_path / "rep", ReportOptions(resamples=500))
    sig = next(t for t in html_tables(tmp_path / "rep" / "report.html") if "differences to Backward Search" in t["caption"])
    col = sig["header"].index("Δ vs backward[lam=0]")
    cells = {r[0]: r[col] for r in sig["rows"]}
    assert cells["same"].startswith("+0.000") and "✱" not in cells["same"]
    assert cells["shifted"].startswith("+0.100") and cells["shifted"].endswith("✱")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| shifted |" in md and md.count("✱") >= 1


def test_every_metric_cell_shows_mean_and_interval(tmp_path):
    rng = np.random.default_rng(0)
    run = fake_run(tmp_path / "run", {"backward[lam=0]": rng.uniform(0, 1, 40), "backward[lam=0.005]":
                                      rng.uniform(0, 1, 40), "knn": rng.uniform(0, 0.3, 40)})
    write_html_report(classify([run]), tmp_path / "rep", ReportOptions(resamples=300))
    _assert_metric_cells(tmp_path / "rep" / "report.html")


def _assert_metric_cells(page: Path) -> int:
    checked = 0
    for t in html_tables(page):
        cap = t["caption"]
        if not ("[95 % CI]" in cap or "[95 % bootstrap CI]" in cap):
            continue
        for row in t["rows"]:
            for head, v in zip(t["header"][1:], row[1:]):
                if head.startswith("Δ") or v.startswith("weights missing") or head in ("lam", "seed", "config",
                                                                                      "query_set"):
                    continue
                assert v == "—" or CI_CELL.match(v), f"{cap}: {head} = {v!r}"
                checked += 1
    assert checked
    return checked


class _Elements(HTMLParser):
    """Every start tag of a page with its attribute names, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, tuple[str, ...]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, tuple(sorted(name for name, _ in attrs))))

    def handle_data(self, data):
        self.text.append(data)


def test_labels_ids_and_property_names_from_data_create_nothing_in_either_report(tmp_path):
    """A report is a file people send each other: what a CSV held is shown as text, never
    read as HTML or Markdown. The hostile run's pages have exactly the benign run's elements."""
    from collections import Counter

    hostile = {"prop": "<style>table{display:none}</style>",
               "label": "<meta http-equiv=refresh content=0;url=http://example.invalid>"
                        "<script>alert(1)</script>|x](javascript:alert(1))",
               "id_prefix": "<img src=x onerror=alert(1)>![t](http://example.invalid/t.png)"}
    benign = {"prop": "style", "label": "a", "id_prefix": ""}
    rng = np.random.default_rng(0)
    per_method = {"knn": rng.uniform(0.2, 0.6, 30), "backward[lam=0.005]": rng.uniform(0.4, 0.9, 30)}
    pages = {}
    for name, names in (("benign", benign), ("hostile", hostile)):
        run = fake_run(tmp_path / name, per_method, **names)
        html, md = write_html_report(classify([run]), tmp_path / f"{name}-report")
        parser = _Elements()
        parser.feed(html.read_text(encoding="utf-8"))
        pages[name] = (parser, md.read_text(encoding="utf-8"))
    benign_tags, hostile_tags = Counter(pages["benign"][0].tags), Counter(pages["hostile"][0].tags)
    assert hostile_tags == benign_tags, (hostile_tags - benign_tags, benign_tags - hostile_tags)
    text = "".join(pages["hostile"][0].text)
    assert hostile["prop"] in text and "<script>alert(1)</script>" in text  # shown, as text
    md = pages["hostile"][1]
    for raw in ("<style", "<meta", "<script", "<img", "](javascript", "](http"):
        assert raw not in md, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|x]\\(javascript" in md
    # every table row has as many cells as its header: a pipe in a label does not add one
    for block in re.findall(r"(?:^\|.*\n)+", md, flags=re.M):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in block.splitlines()}
        assert len(widths) == 1, block


def test_a_folder_holding_files_of_two_runs_is_refused(tmp_path, monkeypatch, capsys):
    """A run's manifest records each file's sha256 and is written last, after the old one is
    removed: results of another run written beside it (two runs on one folder) are named, and
    a write cut short leaves no manifest, so the old provenance is never shown for new files."""
    from cir_bench.report.inputs import ReportInputError

    rng = np.random.default_rng(1)
    first = fake_run(tmp_path / "a", {"knn": rng.uniform(0, 1, 20), "backward[lam=0.005]": rng.uniform(0, 1, 20)})
    other = fake_run(tmp_path / "b", {"knn": rng.uniform(0, 1, 20)})
    (first / "results.parquet").write_bytes((other / "results.parquet").read_bytes())
    with pytest.raises(ReportInputError, match=r"results.parquet not the file\(s\) manifest.json describes"):
        read_run(first)
    assert main(["report", str(first), "--out", str(tmp_path / "r")]) == 2
    assert "results.parquet not the file(s) manifest.json describes" in capsys.readouterr().err
    # --overwrite killed while writing: the old manifest is gone before the first new file lands
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fake_run(first, {"knn": rng.uniform(0, 1, 20)})
    assert not (first / "manifest.json").exists()
    with pytest.raises(ReportInputError, match="not a complete run directory: missing manifest.json"):
        read_run(first)


def test_pareto_and_the_verdict_by_hand():
    assert pareto_mask(np.array([0.9, 0.8, 0.5, 0.5, np.nan]), np.array([0.3, 0.3, 0.4, 0.35, 0.9])).tolist() == \
        [True, False, True, False, False]
    frame = pd.DataFrame({
        "method": ["backward[lam=0]", "backward[lam=0.01]", "soft_filtered_knn[beta=1]", "knn", "oracle_filtered_knn"],
        "family": ["backward", "backward", "soft_filtered_knn", "knn", "oracle_filtered_knn"],
        "param_name": ["lam", "lam", "beta", None, None], "param": [0.0, 0.01, 1.0, np.nan, np.nan],
        "x": [0.85, 0.6, 0.9, 0.05, 1.0], "y": [0.29, 0.36, 0.31, 0.35, 0.5]})
    frame["reference_only"] = frame["family"] == "oracle_filtered_knn"
    frame["pareto"] = False
    live = ~frame["reference_only"]
    frame.loc[live, "pareto"] = pareto_mask(frame.loc[live, "x"].to_numpy(), frame.loc[live, "y"].to_numpy())
    assert frame["pareto"].tolist() == [False, True, True, False, False]
    text = verdict(frame, "style", "context@10")
    assert "2 are on the precision@10–context@10 frontier" in text
    assert "Backward Search is on it at λ ∈ {0.01} and dominated at λ ∈ {0}" in text
    assert text.count(".") >= 1 and "\n" not in text


def test_a_mean_over_few_queries_takes_no_part_in_the_frontier(tmp_path):
    """knn's hit context over its 9 queries with a hit would top the axis; it is left out, named."""
    results = {"knn": np.r_[np.ones(9), np.zeros(31)], "soft_filtered_knn[beta=1]": np.full(40, 0.8)}
    run_dir = fake_run(tmp_path / "r", results)
    run = read_run(run_dir)
    est = estimates(run, resamples=100)
    hit = est[est["metric"] == "precision_at_10"].copy()
    hit["metric"] = "hit_context_at_10"
    hit["mean"] = np.where(hit["method"] == "knn", 0.9, 0.3)
    hit["n"] = np.where(hit["method"] == "knn", 9, 40)
    frame = points(run, pd.concat([est[est["metric"] != "hit_context_at_10"], hit]), "style", "hit_context_at_10")
    assert frame.set_index("method").loc["knn", "too_few_queries"]
    assert frame.set_index("method")["pareto"].to_dict() == {"knn": False, "soft_filtered_knn[beta=1]": True}
    text = verdict(frame, "style", "hit context@10")
    assert "(1 method(s) left out: hit context@10 of fewer than 30 queries, e.g. knn on 9)" in text


def test_runs_of_one_config_with_other_seeds_are_pooled(tmp_path):
    a = fake_run(tmp_path / "s0", {"backward[lam=0]": np.full(10, 0.5)}, seed=0)
    b = fake_run(tmp_path / "s1", {"backward[lam=0]": np.full(10, 0.7)}, seed=1)
    write_html_report(classify([a, b]), tmp_path / "rep", ReportOptions(resamples=100))
    pooled = next(t for t in html_tables(tmp_path / "rep" / "report.html") if t["caption"].startswith("Pooled"))
    assert pooled["rows"] == [["backward[lam=0]", "0.600 ± 0.141 (n=2)"]]


def test_report_refuses_what_is_not_an_output_and_names_the_missing_file(tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.csv").write_text("query_set,method\n")
    assert main(["report", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "missing manifest.json, results.parquet, items.parquet" in err and str(partial) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "tune_results.parquet" in err and "loadtest.json" in err and "manifest.json" in err
    junk = tmp_path / "x.json"
    junk.write_text("[1, 2]")
    assert main(["report", str(junk)]) == 2
    assert "neither a load test" in capsys.readouterr().err


# ------------------------------------------------------------------ a real run, end to end

@pytest.fixture(scope="module")
def tiny_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["run", "--no-progress", *sum((["--set", o] for o in tiny_overrides(cache_dir, out)), [])]) == 0
    return out, buf.getvalue()


def test_run_ends_with_the_report_path_and_every_section(tiny_run):
    out, printed = tiny_run
    last = printed.strip().splitlines()[-1]
    assert last.startswith("report (") and last.endswith(str((out / "report.html").resolve()))
    page = (out / "report.html").read_text()
    for heading in ("Table 2 layout", "The precision–context frontier", "Uncertainty and significance",
                    "Metrics against λ", "Where the query moves", "Retrieval grids", "Per-class precision",
                    "Iterations of Backward Search", "Provenance"):
        assert heading in page, heading
    assert "soft_filtered_knn[beta=1]" in page and "hit context@10" in page
    # SynthArt has exact twins: their recall is a column and a frontier of its own, which on the
    # tiny run's few twin queries draws no conclusion
    assert "exact-target recall@10" in page
    assert "no method has both precision@10 and exact-target recall@10 on 30 queries or more" in page
    assert "(n=" in page  # a metric defined on fewer queries than the set says on how many
    # 40 queries over 6 styles: no condition has the 30 queries a ranking sentence needs
    assert "style: no condition has 30 queries or more; conditions are not ranked" in page
    assert "Retrieval grids not drawn" not in page  # SynthArt renders its images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<script" not in page
    assert _assert_metric_cells(out / "report.html") > 50
    run = read_run(out)
    est = estimates(run, resamples=200)
    for qs in ("style", "style+shape"):
        frame = points(run, est, qs, "context_at_10")
        assert frame["pareto"].any() and not frame.loc[frame["reference_only"], "pareto"].any()
        assert f"{qs}: of " in page  # its verdict sentence
    figures = sorted(p.name for p in (out / "report_figures").iterdir())
    assert any(f.startswith("run0_frontier_style") for f in figures)
    assert sum(f.startswith("run0_grid_") for f in figures) == 6 and any("map_" in f for f in figures)
    md = (out / "report.md").read_text()
    assert "](report_figures/run0_frontier_style.png)" in md and "| method |" in md


def test_report_of_run_compare_tune_loadtest_and_benchmark_together(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    tune = tmp_path / "tune" / "exp" / "report"
    tune.mkdir(parents=True)
    pd.DataFrame([
        {"kind": "sweep", "query_set": "style", "lam": lam, "model.backbone": "small_cnn", "precision_at_10": p,
         "precision_at_10_ci_low": p - 0.05, "precision_at_10_ci_high": p + 0.05, "mts_at_10": 0.2}
        for lam, p in ((0.0, 0.8), (0.01, 0.6))] + [
        {"kind": "calibrated", "query_set": "style", "lam": 0.004, "model.backbone": "small_cnn",
         "precision_at_10": 0.7, "precision_at_10_ci_low": 0.65, "precision_at_10_ci_high": 0.75, "mts_at_10": 0.18,
         "cal_status": "ok"}]).to_parquet(tune / "tune_results.parquet")
    load = tmp_path / "load"
    load.mkdir()
    (load / "loadtest.json").write_text(json.dumps({"url": "http://127.0.0.1:8000", "stages": [
        {"method": "student", "mode": "closed", "concurrency": c, "rate": None, "requests": 50, "errors": 0,
         "p50_ms": 10.0 + c, "p90_ms": 12.0 + c, "p99_ms": 15.0 + c, "qps": 90.0 * c} for c in (1, 4)]}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "cpu", "query_sets": {"style": {
        "n_queries": 100, "ms_per_query": {"student": 0.02, "teacher_batched": 0.3, "teacher_per_query": 4.0},
        "speedup_batched_vs_per_query": 13.3, "identical_top10_batched_vs_per_query": 0.99,
        "engines": {"fast_engine": "fixed", "sizes": [1, 1000], "eager": {"batch_1_ms": 6.0, "batch_1000_ms": 83.0,
                    "capture_s": 0.0}, "fixed": {"batch_1_ms": 6.1, "batch_1000_ms": 1465.0, "capture_s": 0.0},
                    "speedup": {"batch_1": 0.98, "batch_1000": 0.057}, "identical_top10": 1.0},
        "gradients": {"sizes": [1, 1000], "autograd": {"batch_1_ms": 7.94, "batch_1000_ms": 135.3, "capture_s": 0.0},
                      "by_hand": {"batch_1_ms": 5.43, "batch_1000_ms": 109.5, "capture_s": 0.0},
                      "speedup": {"batch_1": 1.4631, "batch_1000": 1.2363}, "identical_top10": 1.0}}}}))
    rep = tmp_path / "all"
    assert main(["report", str(out), str(tune.parent), str(load), str(bench), "--out", str(rep),
                 "--resamples", "200", "--grid-queries", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(str((rep / "report.html").resolve()))
    page = (rep / "report.html").read_text()
    for heading in ("Table 3 layout", "λ sweep of every configuration", "Table 5 layout", "Table 6 layout",
                    "HTTP latency per stage", "Tune experiments", "Load tests", "Benchmarks"):
        assert heading in page, heading
    assert "0.700 [0.650, 0.750]" in page  # Table 3 cell with its interval, from the tidy file
    assert "Backward Search run two ways" in page and "by_hand" in page and "1.463" in page  # gradients' speed-up
    assert (rep / "comparison.md").is_file()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is absent (Debian: apt-get install -y chromium); "
                    ".ci/run installs it")
def test_report_opens_offline_in_headless_chromium_with_every_image(tiny_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    out, _ = tiny_run
    outside: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith(("file:", "data:")):
            r.continue_()
        else:  # anything else would leave the machine
            outside.append(url)
            r.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", route)
            page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
            title = page.title()
            page.screenshot(path=str(tmp_path / "report-top.png"))
        finally:
            browser.close()
    assert title == "cir-bench report"
    assert len(images) >= 10 and all(done and width > 0 for done, width, _ in images), images
    assert all(alt for _, _, alt in images)
    assert outside == []
    assert (tmp_path / "report-top.png").stat().st_size > 10_000


def test_one_cell_has_one_interval_in_every_table(tiny_run):
    """The significance table and the metric tables resample each query set with the same seed."""
    from cir_bench.report.stats import significance_table

    out, _ = tiny_run
    run = read_run(out)
    est = estimates(run, resamples=500, seed=3)
    sig = significance_table(run.results, "precision_at_10", ["knn"], resamples=500, seed=3)
    merged = sig.drop_duplicates(["query_set", "method"]).merge(
        est[est["metric"] == "precision_at_10"], on=["query_set", "method"])
    assert len(merged) == len(est[est["metric"] == "precision_at_10"])
    assert np.allclose(merged["ci_low"], merged["low"]) and np.allclose(merged["ci_high"], merged["high"])


def _frontier_run(per_method: dict[str, tuple[np.ndarray, np.ndarray]]):
    """What membership and dominance read: per-query precision@10 and context@10 per method."""
    from types import SimpleNamespace

    rows = [{"query_set": "style", "method": m, "query_id": f"q{i:03d}", "metric_precision_at_10": float(x[i]),
             "metric_context_at_10": float(y[i])} for m, (x, y) in per_method.items() for i in range(len(x))]
    results = pd.DataFrame(rows)
    means = [{"method": m, "family": m, "param_name": None, "param": np.nan, "x": x.mean(), "y": y.mean(),
              "reference_only": False, "too_few_queries": False} for m, (x, y) in per_method.items()]
    frame = pd.DataFrame(means)
    frame["pareto"] = pareto_mask(frame["x"].to_numpy(), frame["y"].to_numpy())
    return SimpleNamespace(results=results, k=10), frame


def test_frontier_membership_matches_a_plain_bootstrap():
    from cir_bench.report.frontier import membership

    rng = np.random.default_rng(5)
    data = {f"m{j}": (rng.uniform(0, 1, 40) * (0.5 + j / 10), rng.uniform(0, 1, 40) * (1 - j / 10)) for j in range(5)}
    run, frame = _frontier_run(data)
    got = membership(run, frame, "style", "context_at_10", resamples=300, seed=2)
    draws = np.random.default_rng([2, 83]).integers(0, 40, size=(300, 40))
    names = list(data)
    counts = dict.fromkeys(names, 0)
    for idx in draws:
        means = {m: (sum(data[m][0][i] for i in idx) / 40, sum(data[m][1][i] for i in idx) / 40) for m in names}
        for m in names:
            beaten = any(means[o][0] >= means[m][0] and means[o][1] >= means[m][1]
                         and (means[o][0] > means[m][0] or means[o][1] > means[m][1]) for o in names if o != m)
            counts[m] += not beaten
    assert got.to_dict() == pytest.approx({m: counts[m] / 300 for m in names})


def test_dominated_only_when_paired_tests_separate_the_points():
    from cir_bench.report.frontier import dominance, verdict

    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.7, 60)
    clearly = {"backward[lam=0.01]": (base, base), "knn": (base - 0.2, base - 0.2),  # separable: beaten on both
               # below on both axes in the means, but by far less than the per-query noise: not separable
               "backward[lam=0]": (base + 0.01 * rng.permutation(np.repeat([-1.0, 1.0], 30)) - 0.0005,
                                   base + 0.01 * rng.permutation(np.repeat([-1.0, 1.0], 30)) - 0.0005)}
    run, frame = _frontier_run(clearly)
    frame.loc[frame["method"].str.startswith("backward"), "family"] = "backward"
    frame.loc[frame["method"].str.startswith("backward"), "param_name"] = "lam"
    frame.loc[frame["method"] == "backward[lam=0.01]", "param"] = 0.01
    frame.loc[frame["method"] == "backward[lam=0]", "param"] = 0.0
    table = dominance(run, frame, "style", "context_at_10", resamples=2000).set_index("method")
    assert table.loc["knn", "dominated"] and table.loc["knn", "by"] == "backward[lam=0.01]"
    assert table.loc["knn", "p_holm"] < 0.01
    assert not table.loc["backward[lam=0]", "dominated"]
    text = verdict(frame, "style", "context@10", dominated=table.reset_index())
    assert "Backward Search is on it at λ ∈ {0.01}, off it but not separable from it at λ ∈ {0}" in text


def test_pooled_differences_mark_only_what_exceeds_both_query_and_seed_noise(tmp_path):
    """Three seeds on the same 40 queries: ``steady`` beats the reference by 0.2 in every seed
    (both intervals exclude 0); ``flip`` beats it by a wide margin in one seed and loses in
    the others, each seed's gap large against its query noise (query interval excludes 0 only
    in the seed where it wins; pooled, the seeds disagree: no mark); ``noise`` has a zero
    mean difference."""
    from cir_bench.report.tables import SEED_T_975, pooled_differences
    from cir_bench.report.inputs import read_run

    rng = np.random.default_rng(3)
    ref = rng.uniform(0.3, 0.5, 40)
    runs = []
    for seed, flip in enumerate([0.45, -0.1, -0.15]):
        runs.append(read_run(fake_run(tmp_path / f"s{seed}", {
            "backward[lam=0.005]": ref, "steady": ref + 0.2 + rng.normal(0, 0.01, 40),
            "flip": ref + flip, "noise": ref + np.r_[np.full(20, 0.1), np.full(20, -0.1)]}, seed=seed)))
    d = pooled_differences(runs, "precision_at_10", "backward[lam=0.005]", resamples=500).set_index("method")
    assert d.loc["steady", "significant"] and not d.loc["flip", "significant"] and not d.loc["noise", "significant"]
    # hand computation of the pooled difference and the seed interval of ``flip``
    per_seed = np.array([0.45, -0.1, -0.15])
    assert d.loc["flip", "delta"] == pytest.approx(per_seed.mean())
    half = SEED_T_975[3] * per_seed.std(ddof=1) / np.sqrt(3)
    assert d.loc["flip", "seed_low"] == pytest.approx(per_seed.mean() - half)
    # flip's query interval alone would have marked it: every query moves the same way
    assert d.loc["flip", "query_low"] > 0 or d.loc["flip", "query_high"] < 0
    assert d.loc["noise", "query_low"] < 0 < d.loc["noise", "query_high"]
    write_html_report(classify([r.path for r in runs]), tmp_path / "rep", ReportOptions(resamples=100))
    table = next(t for t in html_tables(tmp_path / "rep" / "report.html") if "minus" in t["caption"])
    marks = {row[1]: row[-1] for row in table["rows"]}
    assert marks == {"steady": "✱", "flip": "", "noise": ""}
