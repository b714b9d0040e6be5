"""End-to-end latency of `cir-bench serve` under variants of its serve config, side by side in
one run; prints JSON (and writes it with --out).

Each variant is the shipped serve/config.yaml with some keys changed (``VARIANTS`` below, or
``--variant NAME:key=value;key=value``; a key ``run.<key>`` sets the run config of that server,
e.g. ``run.search.compile=true``; ``checkout=PATH`` serves the code of another source tree, e.g.
a worktree of an earlier commit, with that tree's serve/config.yaml as its base: an A/B of
two commits on one machine, interleaved). For every round, every variant in turn (the order
rotates per round, so drift on a noisy machine spreads over all of them): start `cir-bench
serve` on a free loopback port, wait until it answers, then

- ``stages``: closed-loop load with the project's load tester (cir_bench.serving.loadtest:
  aiohttp, GET /search by item id) per method and concurrency: p50/p90/p99 ms and requests/s;
- ``breakdown``: N sequential keep-alive GETs per method with the stdlib client, the client's
  latency beside the server's own ``timing_ms`` per stage (median): what the server spends,
  and what the hops and HTTP around it add (client − server total);
- ``client_healthz_p50_ms``: GET /healthz through aiohttp, httpx and http.client: what a
  client adds of its own;
- ``stop_s``: how long Ctrl+C (SIGINT) takes to end the server.

``summary`` holds the median over rounds per variant, ``ratios`` each variant against the
first (p50 and p99 at concurrency 1: first / variant, so > 1 is faster; requests/s at the
highest concurrency: variant / first).

    .venv/bin/python benchmarks/serve_latency.py [--rounds 2] [--methods student,teacher,knn]
        [--concurrency 1,16] [--duration 8] [--variants before,shipped] [--variant NAME:key=value;...]
        [--set key=value ...]

``--set`` goes to `cir-bench serve` (the run config: which model and dataset are served; the
default is SynthArt default, trained and cached on first use).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> serve-config keys changed from the shipped file ("section.key": value)
_OFF = {"ray_serve.haproxy": False, "ray_serve.throughput_optimized": False}
_TEACHER_DEPLOYMENT = {"ingress.local": ["student", "index"], "teacher.compile": False}
VARIANTS: dict[str, dict[str, Any]] = {
    # one change at a time, from the config shipped before issue 14's serving work to today's
    "before": {**_OFF, **_TEACHER_DEPLOYMENT},
    "haproxy": {"ray_serve.throughput_optimized": False, **_TEACHER_DEPLOYMENT},
    "throughput_optimized": dict(_TEACHER_DEPLOYMENT),
    "teacher_in_ingress": {"teacher.compile": False},
    "shipped": {},
    # the GPU machine's layout on this machine: the teacher a deployment of its own
    "teacher_deployment": {"ingress.local": ["student", "index"]},
}


def _set_key(config: dict, dotted: str, value: Any) -> None:
    node = config
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def variant_config(base: dict, changes: dict[str, Any]) -> dict:
    """The serve config of a variant (its ``run.*`` keys go to the run config instead, and
    ``checkout`` chooses the code)."""
    config = json.loads(json.dumps(base))
    for key, value in changes.items():
        if not key.startswith("run.") and key != "checkout":
            _set_key(config, key, value)
    return config


def variant_run_args(changes: dict[str, Any]) -> list[str]:
    """``run.search.compile: true`` -> ``--set search.compile=true`` for `cir-bench serve`."""
    out = []
    for key, value in changes.items():
        if key.startswith("run."):
            text = json.dumps(value) if not isinstance(value, str) else value
            out += ["--set", f"{key[4:]}={text}"]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`cir-bench serve` in a subprocess (its own local Ray), stopped with SIGINT."""

    def __init__(self, config_path: Path, port: int, run_args: list[str], log: Path,
                 checkout: Path = ROOT) -> None:
        self.port, self.log_path = port, log
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "cir_bench.cli", "serve", "--serve-config", str(config_path),
               "--port", str(port), "--no-progress", *run_args]
        # the checkout's packages first (its Ray workers inherit the variable)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout),
                                                                         os.environ.get("PYTHONPATH")]))}
        # its own process group: Ctrl+C on the benchmark does not reach it twice
        self.proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cir-bench serve exited with {self.proc.returncode}; log: {self.log_path}")
            if "stop with Ctrl+C" not in self.log_path.read_text(errors="replace"):
                time.sleep(0.5)  # not deployed yet (and until then the port may be anyone's)
                continue
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    return time.monotonic() - t0
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cir-bench serve did not answer in {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        return time.monotonic() - t0


def breakdown(port: int, examples: list[dict], method: str, n: int, warmup: int = 20) -> dict[str, float]:
    """Sequential keep-alive GETs (stdlib client, no event loop): client ms and the server's
    timing_ms per stage, medians."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    client, stages = [], {}
    for i in range(n + warmup):
        ex = examples[i % len(examples)]
        query = [("item_id", ex["item_id"]), ("method", method), ("k", "10"), *ex["conditions"].items()]
        t0 = time.perf_counter()
        conn.request("GET", "/search?" + urlencode(query))
        response = conn.getresponse()
        body = response.read()
        ms = 1000 * (time.perf_counter() - t0)
        if response.status != 200:
            raise RuntimeError(f"{method}: HTTP {response.status}: {body[:300]!r}")
        if i < warmup:
            continue
        client.append(ms)
        for key, value in json.loads(body)["timing_ms"].items():
            stages.setdefault(key, []).append(value)
    conn.close()
    out = {"client_p50_ms": float(np.percentile(client, 50)), "client_p99_ms": float(np.percentile(client, 99))}
    out.update({f"server_{k}_ms": float(statistics.median(v)) for k, v in stages.items()})
    out["outside_server_ms"] = out["client_p50_ms"] - out["server_total_ms"]
    return out


def healthz(port: int, n: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat = []
    for i in range(n + 20):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        if i >= 20:
            lat.append(1000 * (time.perf_counter() - t0))
    conn.close()
    return float(np.percentile(lat, 50))


def client_overhead(port: int, n: int = 300) -> dict[str, float]:
    """GET /healthz p50 ms through three HTTP clients, one after another on one server: what a
    load tester's own client adds (cir_bench.serving.loadtest uses aiohttp)."""
    url = f"http://127.0.0.1:{port}/healthz"

    async def with_aiohttp() -> list[float]:
        import aiohttp

        out = []
        async with aiohttp.ClientSession() as session:
            for _ in range(n + 30):
                t0 = time.perf_counter()
                async with session.get(url) as r:
                    await r.read()
                out.append(1000 * (time.perf_counter() - t0))
        return out[30:]

    async def with_httpx() -> list[float]:
        import httpx

        out = []
        async with httpx.AsyncClient() as client:
            for _ in range(n + 30):
                t0 = time.perf_counter()
                await client.get(url)
                out.append(1000 * (time.perf_counter() - t0))
        return out[30:]

    result = {"aiohttp": float(np.percentile(asyncio.run(with_aiohttp()), 50)),
              "http.client": healthz(port, n)}
    try:
        result["httpx"] = float(np.percentile(asyncio.run(with_httpx()), 50))
    except ImportError:  # httpx comes with the test extra only
        pass
    return result


def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    from cir_bench.serving.loadtest import Stage, run_stage, summarize

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/examples?n=64")
    examples = json.loads(conn.getresponse().read())
    conn.close()
    out: dict[str, Any] = {"healthz_p50_ms": healthz(port, args.sequential), "breakdown": {}, "stages": [],
                           "client_healthz_p50_ms": client_overhead(port)}
    for method in args.methods:
        out["breakdown"][method] = breakdown(port, examples, method, args.sequential)
    url = f"http://127.0.0.1:{port}/search"
    for method in args.methods:
        for c in args.concurrency:
            stage = Stage(method, "closed", concurrency=c, duration_s=args.duration, warmup_s=args.warmup,
                          max_requests=args.max_requests, via="get")
            samples, sent = asyncio.run(run_stage(url, examples, stage))
            row = summarize(samples, stage, capped=sent >= stage.max_requests)
            out["stages"].append({k: row[k] for k in ("method", "concurrency", "requests", "errors", "p50_ms",
                                                      "p90_ms", "p99_ms", "qps", "capped")})
    return out


def summarise(rows: list[dict], variants: list[str], methods: list[str], concurrency: list[int]) -> tuple[dict, dict]:
    summary: dict[str, Any] = {}
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        per: dict[str, Any] = {"healthz_p50_ms": statistics.median(r["healthz_p50_ms"] for r in mine),
                               "stop_s": statistics.median(r["stop_s"] for r in mine),
                               "client_healthz_p50_ms": {c: statistics.median(r["client_healthz_p50_ms"][c] for r in mine)
                                                         for c in mine[0]["client_healthz_p50_ms"]}}
        for m in methods:
            entry: dict[str, float] = {}
            for c in concurrency:
                stage = [s for r in mine for s in r["stages"] if s["method"] == m and s["concurrency"] == c]
                for key in ("p50_ms", "p99_ms", "qps"):
                    entry[f"c{c}_{key}"] = statistics.median(s[key] for s in stage)
            for key in mine[0]["breakdown"][m]:
                entry[f"seq_{key}"] = statistics.median(r["breakdown"][m][key] for r in mine)
            per[m] = entry
        summary[name] = per
    first, top = variants[0], max(concurrency)
    ratios: dict[str, Any] = {}
    for name in variants[1:]:
        ratios[f"{name} vs {first}"] = {m: {
            "c1_p50_speedup": summary[first][m]["c1_p50_ms"] / summary[name][m]["c1_p50_ms"],
            "c1_p99_speedup": summary[first][m]["c1_p99_ms"] / summary[name][m]["c1_p99_ms"],
            f"c{top}_qps_ratio": summary[name][m][f"c{top}_qps"] / summary[first][m][f"c{top}_qps"],
        } for m in methods if 1 in concurrency}
    return summary, ratios


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` (one of VARIANTS) or ``NAME:key=value;key=value`` (values as YAML)."""
    name, _, spec = text.partition(":")
    if not spec:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)} "
                             "(or NAME:key=value,...)")
        return name, VARIANTS[name]
    changes = {}
    for item in spec.split(";"):
        key, _, value = item.partition("=")
        changes[key.strip()] = yaml.safe_load(value)
    return name, changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="before,shipped",
                    help=f"comma-separated names; known: {', '.join(VARIANTS)}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;KEY=VALUE",
                    help="one more variant (repeatable), e.g. 'wait0:batching.teacher.batch_wait_timeout_s=0'")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="student,teacher,knn")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per load stage")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per load stage (excluded)")
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--sequential", type=int, default=100, help="sequential requests per method (breakdown)")
    ap.add_argument("--serve-config", default=str(ROOT / "serve" / "config.yaml"), help="the base serve config")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--set", action="append", default=[], help="run-config override for cir-bench serve")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    variants = dict(parse_variant(v) for v in [*args.variants.split(","), *args.variant] if v)
    base = yaml.safe_load(Path(args.serve_config).read_text())
    run_args = [a for s in args.set for a in ("--set", s)]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        names = list(variants)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                checkout = Path(variants[name].get("checkout") or ROOT).resolve()
                own_base = base if checkout == ROOT else yaml.safe_load((checkout / "serve" / "config.yaml").read_text())
                cfg_path = Path(tmp) / f"{name}.yaml"
                cfg_path.write_text(yaml.safe_dump(variant_config(own_base, variants[name])))
                port = free_port()
                server = Server(cfg_path, port, run_args + variant_run_args(variants[name]),
                                Path(tmp) / f"{name}-{rnd}.log", checkout)
                try:
                    start_s = server.wait_ready(args.start_timeout)
                    print(f"round {rnd + 1}/{args.rounds}: {name} on :{port} (ready in {start_s:.0f} s)",
                          file=sys.stderr, flush=True)
                    t0 = time.monotonic()
                    row = {"variant": name, "round": rnd, "start_s": start_s, **measure(port, args)}
                    print(f"  measured in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
                finally:
                    stop_s = server.stop()
                print(f"  stopped in {stop_s:.1f} s", file=sys.stderr, flush=True)
                row["stop_s"] = stop_s
                rows.append(row)
                if args.out:  # what was measured so far survives an interrupted run
                    Path(args.out).write_text(json.dumps({"partial": True, "runs": rows}, indent=2))
    summary, ratios = summarise(rows, list(variants), args.methods, args.concurrency)
    from cir_bench.results.run_files import git_revision, host_info

    checkouts = {name: git_revision(Path(v["checkout"]).resolve()) for name, v in variants.items() if "checkout" in v}
    result = {"benchmark": "serve_latency", "machine": host_info(), "git": git_revision(ROOT),
              "checkouts": checkouts, "variants": variants, "methods": args.methods, "concurrency": args.concurrency,
              "rounds": args.rounds, "duration_s": args.duration, "summary": summary, "ratios": ratios, "runs": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
