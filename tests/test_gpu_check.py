"""The GPU check (benchmarks/gpu_check.sh): its dry run on the CPU runs every stage end to end,
a stage that fails makes the exit non-zero and names itself, and the targets are read from the
files the stages wrote."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def load_gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run_check(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CIR_BENCH_CACHE": str(tmp_path / "cache")}
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_dry_run_on_the_cpu_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = run_check(tmp_path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["device"] == "cpu"
    assert [s["name"] for s in summary["stages"]] == ["environment", "cuda_tests", "model", "backward_search",
                                                       "serve", "loadtest", "report"]
    assert all(s["status"] == "ok" for s in summary["stages"])
    assert json.loads(proc.stdout)["complete"] is True

    env = json.loads((out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["torch"]
    tests = json.loads((out / "cuda_tests.json").read_text())
    assert tests["tests"] >= 10 and tests["failed"] == tests["error"] == 0
    if not env["cuda_available"]:
        assert tests["skipped"] == tests["tests"] and all("CUDA" in c["message"] for c in tests["cases"])
    assert json.loads((out / "model.json").read_text())["checkpoint"]

    bs = json.loads((out / "backward_search.json").read_text())
    assert bs["complete"] and bs["device"] == "cpu" and set(bs["query_sets"]) == {"style", "style+shape"}
    for qs in bs["query_sets"].values():
        eng = qs["engines"]
        assert eng["sizes"] == [1, 40] and {"eager", "fixed", "fixed+compile"} <= set(eng)
        assert 0 <= eng["identical_top10_fixed"] <= 1 and eng["eager"]["batch_1_ms"] > 0

    stats = json.loads((out / "serve_stats.json").read_text())
    assert stats["serve_config"] == "serve/config.yaml" and stats["stats"]
    assert any(v.get("batch_sizes") for v in stats["stats_after_load"].values())  # what the load made
    stages = json.loads((out / "loadtest" / "loadtest.json").read_text())["stages"]
    assert sorted((s["method"], s["concurrency"]) for s in stages) == sorted(
        (m, c) for m in ("student", "teacher", "knn") for c in (1, 16, 64))
    assert all(s["via"] == "get" and s["requests"] > 0 and s["errors"] == 0 for s in stages)
    assert (out / "report" / "report.html").is_file()

    rows = summary["targets"]["rows"]
    assert summary["targets"]["applies"] is False
    assert rows["student_p50_ms_c1"]["measured"] == next(
        s["p50_ms"] for s in stages if s["method"] == "student" and s["concurrency"] == 1)
    assert rows["style: graph_1000_queries_ms"]["measured"] is None  # the dry run has no 1,000-query batch


def test_a_failing_stage_fails_the_check_and_names_itself(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU serve config is not refused here")
    out = tmp_path / "out"
    # the GPU serve config on a machine without CUDA: serve refuses before any work
    proc = run_check(tmp_path, "--out", str(out), "--stages", "environment,serve,loadtest", "--serve-config",
                     str(ROOT / "serve" / "config.gpu.yaml"), timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert proc.returncode == 1 and summary["complete"] is False
    assert stages["environment"]["status"] == "ok"
    assert stages["serve"]["status"] == "failed" and "exited" in stages["serve"]["detail"]
    assert "GPU" in (out / "logs" / "serve.log").read_text()
    assert stages["loadtest"] == {"name": "loadtest", "status": "not run", "seconds": 0.0,
                                  "detail": "needs serve", "files": []}
    assert "model" not in stages  # not asked for


def test_cuda_without_cuda_stops_at_the_environment(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CIR_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--stages", "environment,cuda_tests,model"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["environment"]["status"] == "failed" and "no CUDA device" in stages["environment"]["detail"]
    assert stages["cuda_tests"]["detail"] == stages["model"]["detail"] == "needs environment"


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_targets_compare_the_measured_values(tmp_path):
    gc = load_gpu_check()
    write(tmp_path / "backward_search.json", {"query_sets": {"style": {"engines": {
        "fast_engine": "graph", "sizes": [1, 1000], "eager": {"batch_1_ms": 40.0, "batch_1000_ms": 200.0},
        "graph": {"batch_1_ms": 2.5, "batch_1000_ms": 16.0}, "speedup_graph": {"batch_1": 16.0, "batch_1000": 12.5},
        "identical_top10_graph": 0.995}}}})
    stage = {"mode": "closed", "requests": 100, "errors": 0}
    write(tmp_path / "loadtest" / "loadtest.json", {"stages": [
        {**stage, "method": "teacher", "concurrency": 1, "p50_ms": 7.5, "qps": 130.0},
        {**stage, "method": "teacher", "concurrency": 64, "p50_ms": 50.0, "qps": 1200.0, "errors": 3},
        {**stage, "method": "student", "concurrency": 1, "p50_ms": 4.5, "qps": 220.0}]})
    rows = gc.targets(tmp_path, "cuda")["rows"]
    assert rows["style: graph_1000_queries_ms"] == {"target": 15.0, "measured": 16.0, "met": False}
    assert rows["style: graph_speedup_vs_eager_1000"]["met"] is True
    assert rows["style: graph_1_query_ms"]["met"] is True
    assert rows["style: identical_top10_graph_vs_eager"]["met"] is True
    assert rows["teacher_p50_ms_c1"]["met"] is True
    assert rows["teacher_rps_c64"] == {"target": 1000.0, "measured": None, "met": None, "errors": 3}  # errors: no pass
    assert rows["student_p50_ms_c1"]["met"] is False


def test_the_readme_tables_are_built_from_the_files(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    write(gpu / "environment.json", {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda", "cpus": 16})
    write(cpu / "environment.json", {"device": "cpu", "cpus": 2})
    write(gpu / "backward_search.json", {"query_sets": {"style": {"engines": {
        "fast_engine": "graph", "sizes": [1, 1000], "eager": {"batch_1_ms": 40.0, "batch_1000_ms": 200.0,
                                                               "capture_s": 0.0},
        "graph": {"batch_1_ms": 2.5, "batch_1000_ms": 16.0, "capture_s": 1.25},
        "graph+compile": {"error": "BackendCompilerFailed: no compiler"},
        "speedup_graph": {"batch_1": 16.0, "batch_1000": 12.5}, "identical_top10_graph": 0.995}}}})
    for folder, p50 in ((gpu, 3.25), (cpu, 12.5)):
        write(folder / "summary.json", {})
        write(folder / "loadtest" / "loadtest.json", {"stages": [
            {"mode": "closed", "method": "teacher", "concurrency": 1, "requests": 10, "errors": 0, "p50_ms": p50,
             "p99_ms": 2 * p50, "qps": 1000 / p50}]})
    assert gpu_table.main([str(gpu), str(cpu)]) == 0
    out = capsys.readouterr().out
    assert "| NVIDIA H100 80GB HBM3 (cuda) | style | graph | 2.50 | 16.00 | 12.5× | 99.5 % | 1.2 |" in out
    assert "| NVIDIA H100 80GB HBM3 (cuda) | style | graph+compile | failed: BackendCompilerFailed" in out
    assert "| teacher | 1 | 3.25 / 6.50 | 308 | 0 | 12.50 / 25.00 | 80 | 0 |" in out
    assert "2 CPU cores: p50 / p99 ms" in out
    assert gpu_table.main([str(tmp_path)]) == 2


@pytest.mark.parametrize("args, named", [(["--stage-limit", "foo=3"], "'foo=3'"), (["--stage-limit", "model=x"], "'model=x'"),
                                         (["--stages", "model,serv"], "unknown serv")])
def test_bad_options_are_named_before_any_work(tmp_path, capsys, args, named):
    gc = load_gpu_check()
    with pytest.raises(SystemExit) as stop:
        gc.main(["--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2 and named in capsys.readouterr().err and not (tmp_path / "out").exists()
