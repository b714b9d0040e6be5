"""The GPU check: every GPU claim of cir-bench measured in one run on a CUDA machine with the
project installed and this checkout at hand, within a time budget (default 8 min), all results as
JSON in one folder (``--out``):

- ``environment.json``: GPU, driver, torch/CUDA, Python, cir-bench, the checkout's commit;
- ``cuda_tests.json``: the test suite's CUDA tests (``-m gpu``), each test's outcome;
- ``model.json``: the SynthArt model trained, or loaded from the cache;
- ``backward_search.json``: ``benchmarks/backward_search.py`` (eager vs graph vs compiled graph,
  1 / 1,000 / 10,000 queries, both query sets, identical top-10, capture seconds);
- ``serve_stats.json`` and ``loadtest/``: ``cir-bench serve`` with ``serve/config.gpu.yaml``
  and ``cir-bench loadtest`` (student, teacher, knn; concurrency 1, 16, 64; GET by item id);
- ``report/``: ``cir-bench report`` of the load test and the benchmark JSON;
- ``summary.json``: each stage (ok / failed / timeout / not run, seconds, why) and the GPU
  targets against what was measured.

Exits 0 only if every stage ran. ``--device cpu --quick`` runs every stage on the CPU at toy
sizes (tiny SynthArt, 40 queries, short load stages, the CPU serve config): the dry run that the
test suite runs.

    bash benchmarks/gpu_check.sh [--out DIR] [--device cuda] [--budget-s 480]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import Server, free_port  # noqa: E402  (the one way a benchmark runs `cir-bench serve`)

ROOT = Path(__file__).resolve().parent.parent
CUDA_TEST_FILES = ["tests/test_backward.py", "tests/test_objective.py", "tests/test_models.py",
                   "tests/test_baselines.py", "tests/test_service.py"]
METHODS = ("student", "teacher", "knn")
CONCURRENCY = (1, 16, 64)
# the GPU targets (README, "GPU"): measured values are compared, never assumed
TARGETS = {"graph_1000_queries_ms": 15.0, "graph_speedup_vs_eager_1000": 10.0, "graph_1_query_ms": 3.0,
           "identical_top10_graph_vs_eager": 0.99, "teacher_p50_ms_c1": 8.0, "teacher_rps_c64": 1000.0,
           "student_p50_ms_c1": 4.0}


@dataclass
class Sizes:
    """How big each stage is: the real check, or the dry run's toy sizes."""

    overrides: list[str]
    n_queries: int
    loop_queries: int
    engine_sizes: str
    load_duration_s: float
    load_warmup_s: float
    stage_limits_s: dict[str, float]

    @classmethod
    def full(cls) -> Sizes:
        return cls([], 1000, 60, "1,1000,10000", 4.0, 1.0,
                   {"environment": 30, "cuda_tests": 90, "model": 100, "backward_search": 140, "serve": 60,
                    "loadtest": 75, "report": 30})

    @classmethod
    def quick(cls) -> Sizes:
        return cls(["dataset.options.preset=tiny", "train.epochs=1", "student.epochs=1", "queries.min_relevant=2"], 40, 10, "1,40", 0.5, 0.2,
                   {"environment": 30, "cuda_tests": 120, "model": 60, "backward_search": 150, "serve": 90,
                    "loadtest": 60, "report": 60})


@dataclass
class StageResult:
    name: str
    status: str = "not run"  # ok | failed | timeout | not run
    seconds: float = 0.0
    detail: str = ""
    files: list[str] = field(default_factory=list)


class StageFailed(Exception):
    def __init__(self, detail: str, status: str = "failed") -> None:
        super().__init__(detail)
        self.detail, self.status = detail, status


class Check:
    def __init__(self, out: Path, budget_s: float, sizes: Sizes) -> None:
        self.out, self.sizes = out, sizes
        self.deadline = time.monotonic() + budget_s
        self.stages: list[StageResult] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def limit(self, name: str) -> float:
        return max(0.0, min(self.sizes.stage_limits_s[name], self.deadline - time.monotonic()))

    def stage(self, name: str, body: Callable[[float], list[str]], needs: Sequence[str] = ()) -> StageResult:
        """Run ``body(limit_s)`` (returns the files it wrote); a stage whose inputs failed, or
        that has no time left, does not run and says why."""
        result = StageResult(name)
        self.stages.append(result)
        failed_before = [s.name for s in self.stages if s.name in needs and s.status != "ok"]
        if failed_before:
            result.detail = f"needs {', '.join(failed_before)}"
            return result
        limit = self.limit(name)
        if limit < 5:
            result.detail = "no time left in the budget"
            return result
        t0 = time.monotonic()
        try:
            result.files = body(limit)
            result.status = "ok"
        except StageFailed as err:
            result.status, result.detail = err.status, err.detail
        except Exception as err:  # a stage's own bug must not hide the other stages' results
            result.status, result.detail = "failed", f"{type(err).__name__}: {err}"
        result.seconds = round(time.monotonic() - t0, 2)
        print(f"[gpu-check] {name}: {result.status} in {result.seconds:.1f} s {result.detail}", file=sys.stderr,
              flush=True)
        return result

    def command(self, name: str, cmd: Sequence[str], limit: float, stdout: Path | None = None) -> None:
        """Run ``cmd`` in the checkout, its output in logs/NAME.log (stdout to ``stdout`` when
        given); a non-zero exit or the time limit fails the stage."""
        log = self.out / "logs" / f"{name}.log"
        with open(log, "w") as err, open(stdout or log.with_suffix(".out"), "w") as std:
            try:
                proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=std, stderr=err, timeout=limit,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                raise StageFailed(f"stopped at its limit of {limit:.0f} s (log: logs/{log.name})", "timeout") from None
        if proc.returncode != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise StageFailed(f"exit {proc.returncode}: {tail[-400:]}")

    def write_summary(self, device: str, targets: dict) -> bool:
        complete = all(s.status == "ok" for s in self.stages)
        summary = {"device": device, "complete": complete, "stages": [asdict(s) for s in self.stages],
                   "targets": targets}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return complete


def environment(device: str) -> dict:
    import torch

    import cir_bench

    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cir_bench": cir_bench.__version__, "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except OSError:
            info["driver"] = None
    return info


def junit_summary(xml_path: Path) -> dict:
    """Counts and each test's outcome from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], \
                    (node.get("message") or "")[:300]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {**counts, "tests": len(cases), "cases": cases}


def http_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise StageFailed(f"GET {path}: HTTP {resp.status}")
    return json.loads(body)


def targets(out: Path, device: str) -> dict:
    """The GPU targets next to the measured values (``met`` is None where not measured, e.g. a
    dry run's sizes have no 1,000-query batch)."""
    rows: dict[str, dict] = {}

    def put(key: str, value: float | None, higher_is_better: bool = False) -> None:
        goal = TARGETS[key]
        met = None if value is None else (value >= goal if higher_is_better else value <= goal)
        rows[key] = {"target": goal, "measured": value, "met": met}

    bs_file = out / "backward_search.json"
    if bs_file.is_file():
        bs = json.loads(bs_file.read_text())
        for qs_name, qs in bs.get("query_sets", {}).items():
            eng = qs.get("engines") or {}
            fast = eng.get("fast_engine")
            if not fast or not isinstance(eng.get(fast), dict) or "batch_1_ms" not in eng[fast]:
                continue
            prefix = f"{qs_name}: "
            for key, value, better in [
                ("graph_1000_queries_ms", eng[fast].get("batch_1000_ms"), False),
                ("graph_speedup_vs_eager_1000", (eng.get(f"speedup_{fast}") or {}).get("batch_1000"), True),
                ("graph_1_query_ms", eng[fast].get("batch_1_ms"), False),
                ("identical_top10_graph_vs_eager", eng.get(f"identical_top10_{fast}"), True)]:
                put(key, value, better)
                rows[prefix + key] = rows.pop(key)
    lt_file = out / "loadtest" / "loadtest.json"
    if lt_file.is_file():
        stages = {(s["method"], s["concurrency"]): s for s in json.loads(lt_file.read_text())["stages"]
                  if s.get("mode") == "closed"}

        def stat(method: str, c: int, key: str) -> float | None:
            s = stages.get((method, c))
            return None if s is None or not s.get("requests") else s.get(key)

        put("teacher_p50_ms_c1", stat("teacher", 1, "p50_ms"))
        errors = (stages.get(("teacher", 64)) or {}).get("errors")
        rps = stat("teacher", 64, "qps")
        put("teacher_rps_c64", rps if errors == 0 else None, True)
        rows["teacher_rps_c64"]["errors"] = errors
        put("student_p50_ms_c1", stat("student", 1, "p50_ms"))
    return {"device": device, "applies": device.startswith("cuda"), "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the GPU check (see the module docstring)")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of every stage)")
    ap.add_argument("--quick", action="store_true", help="toy sizes: tiny SynthArt, 40 queries, short load stages")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time limit")
    ap.add_argument("--serve-config", type=Path, default=None,
                    help="default: serve/config.gpu.yaml on CUDA, serve/config.yaml on the CPU")
    ap.add_argument("--stages", default="", help="comma-separated subset of the stages (default: all)")
    ap.add_argument("--set", action="append", default=[], help="config override for every stage (repeatable)")
    ap.add_argument("--engine-sizes", default=None, help="batch sizes of the engine comparison (default 1,1000,10000)")
    ap.add_argument("--stage-limit", action="append", default=[], metavar="STAGE=SECONDS",
                    help="one stage's time limit (repeatable), e.g. backward_search=900 for a CPU reference run")
    args = ap.parse_args(argv)

    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.engine_sizes is not None:
        sizes.engine_sizes = args.engine_sizes
    for item in args.stage_limit:
        name, _, seconds = item.partition("=")
        if name not in sizes.stage_limits_s or not seconds.replace(".", "", 1).isdigit():
            ap.error(f"--stage-limit {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(sizes.stage_limits_s)}")
        sizes.stage_limits_s[name] = float(seconds)
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()} or set(sizes.stage_limits_s)
    unknown = wanted - set(sizes.stage_limits_s)
    if unknown:
        ap.error(f"--stages: unknown {', '.join(sorted(unknown))}; known: {', '.join(sizes.stage_limits_s)}")
    serve_config = args.serve_config or ROOT / "serve" / ("config.gpu.yaml" if args.device.startswith("cuda")
                                                          else "config.yaml")
    overrides = [f"device={args.device}", *sizes.overrides, *args.set]
    sets = [a for o in overrides for a in ("--set", o)]
    py = sys.executable
    out = args.out.resolve()
    check = Check(out, args.budget_s, sizes)

    def run(name: str, body: Callable[[float], list[str]], needs: Sequence[str] = ()) -> None:
        if name in wanted:
            check.stage(name, body, needs)

    def env_stage(limit: float) -> list[str]:
        info = environment(args.device)
        (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
        if args.device.startswith("cuda") and not info["cuda_available"]:
            raise StageFailed(f"--device {args.device}, but torch {info['torch']} sees no CUDA device")
        return ["environment.json"]

    def tests_stage(limit: float) -> list[str]:
        xml = out / "cuda_tests.xml"
        try:
            check.command("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                         "-m", "gpu", f"--junitxml={xml}", *CUDA_TEST_FILES], limit)
        finally:
            if xml.is_file():
                (out / "cuda_tests.json").write_text(json.dumps(junit_summary(xml), indent=2) + "\n")
        result = json.loads((out / "cuda_tests.json").read_text())
        if args.device.startswith("cuda") and result["passed"] == 0:
            raise StageFailed("no CUDA test ran (all skipped)")
        return ["cuda_tests.json", "cuda_tests.xml"]

    def model_stage(limit: float) -> list[str]:
        check.command("model", [py, "-m", "cir_bench.cli", "train", "--no-progress", *sets], limit,
                      stdout=out / "model.json")
        json.loads((out / "model.json").read_text())  # the command's JSON, or the stage fails
        return ["model.json"]

    def backward_stage(limit: float) -> list[str]:
        target = out / "backward_search.json"
        check.command("backward_search", [py, "benchmarks/backward_search.py", *sets, "--n-queries", sizes.n_queries,
                                          "--loop-queries", sizes.loop_queries, "--engine-sizes",
                                          sizes.engine_sizes, "--out", target], limit, stdout=out / "logs" /
                      "backward_search.out")
        if not json.loads(target.read_text()).get("complete"):
            raise StageFailed("backward_search.json is not complete")
        return ["backward_search.json"]

    server: Server | None = None
    port = free_port()

    def serve_stage(limit: float) -> list[str]:
        nonlocal server
        server = Server(serve_config, port, sets, out / "logs" / "serve.log")
        try:
            ready_s = server.wait_ready(limit)
        except TimeoutError as err:
            raise StageFailed(str(err), "timeout") from None
        shown = serve_config.relative_to(ROOT) if serve_config.is_relative_to(ROOT) else serve_config
        stats = {"serve_config": str(shown), "ready_s": round(ready_s, 2), "stats": http_json(port, "/stats")}
        (out / "serve_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        return ["serve_stats.json"]

    def load_stage(limit: float) -> list[str]:
        check.command("loadtest", [py, "-m", "cir_bench.cli", "loadtest", f"http://127.0.0.1:{port}", "--methods",
                                   ",".join(METHODS), "--concurrency", ",".join(map(str, CONCURRENCY)), "--rates", "",
                                   "--via", "get", "--duration", sizes.load_duration_s, "--warmup",
                                   sizes.load_warmup_s, "--max-requests", 100_000, "--out", out / "loadtest"], limit)
        stats_file = out / "serve_stats.json"
        stats = json.loads(stats_file.read_text())
        stats["stats_after_load"] = http_json(port, "/stats")  # the batch sizes the load made
        stats_file.write_text(json.dumps(stats, indent=2) + "\n")
        ran = json.loads((out / "loadtest" / "loadtest.json").read_text())["stages"]
        if len(ran) != len(METHODS) * len(CONCURRENCY):
            raise StageFailed(f"{len(ran)} load stages ran of {len(METHODS) * len(CONCURRENCY)}")
        return ["loadtest/loadtest.json", "serve_stats.json"]

    def report_stage(limit: float) -> list[str]:
        inputs = [p for p in (out / "loadtest", out / "backward_search.json") if p.exists()]
        check.command("report", [py, "-m", "cir_bench.cli", "report", *inputs, "--out", out / "report"], limit)
        return ["report/report.html"]

    try:
        run("environment", env_stage)
        run("cuda_tests", tests_stage, ("environment",))
        run("model", model_stage, ("environment",))
        run("backward_search", backward_stage, ("environment", "model"))
        run("serve", serve_stage, ("environment", "model"))
        run("loadtest", load_stage, ("serve",))
    finally:
        if server is not None:
            stopped = server.stop()
            print(f"[gpu-check] serve stopped in {stopped:.1f} s", file=sys.stderr)
    run("report", report_stage, ("loadtest", "backward_search"))
    complete = check.write_summary(args.device, targets(out, args.device))
    print(json.dumps({"out": str(out), "complete": complete,
                      "stages": {s.name: s.status for s in check.stages}}, indent=2))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
