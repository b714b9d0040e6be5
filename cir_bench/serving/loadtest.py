"""Load tests against a running ``cir-bench serve``: closed-loop stages (fixed concurrency)
and open-loop stages (fixed arrival rate, latency measured from the *scheduled* send time so
a slow server cannot hide behind a slow client). Warm-up is excluded; every stage is
bounded in time and in request count. Results: JSON + CSV + a seaborn plot.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np


@dataclass
class Stage:
    method: str  # teacher | student | knn
    mode: str  # closed | open
    concurrency: int = 1  # closed loop
    rate: float = 10.0  # open loop, requests per second
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_requests: int = 2000
    via: str = "post"  # post: JSON body to POST /search | get: the same request as GET /search?…


def query_params(body: dict) -> list[tuple[str, str]]:
    """An item-id request body as the query string of GET /search (conditions as property=label)."""
    params = [(k, str(v)) for k, v in body.items() if k not in ("conditions", "image")]
    return params + [(p, str(label)) for p, label in body.get("conditions", {}).items()]


def check_loopback(url: str, allow_remote: bool = False) -> None:
    host = urlparse(url).hostname or ""
    if allow_remote:
        return
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"refusing to load-test {host!r}: loopback only (127.0.0.0/8, ::1, localhost) "
                         "unless --allow-remote")


async def _post(client, url: str, body: dict, t_ref: float, via: str = "post") -> tuple[float, float, int]:
    try:
        request = client.get(url, params=query_params(body)) if via == "get" else client.post(url, json=body)
        async with request as r:
            await r.read()  # the whole answer counts
            status = r.status
    except Exception:
        status = 0
    return t_ref, time.perf_counter() - t_ref, status


async def run_stage(url: str, bodies: list[dict], stage: Stage) -> tuple[list[tuple[float, float, int]], int]:
    """(send time, latency s, HTTP status) per request after warm-up, and how many were sent.

    The client is aiohttp: on 2 cores httpx's AsyncClient spent ≈ 1.5-1.9 ms of its own per
    request on loopback (GET /healthz 2.5-2.8 ms against 0.8-1.1 ms with aiohttp or the stdlib's
    http.client; benchmarks/serve_latency.py), more than the student's whole server time, and a
    load tester's overhead is counted as the server's latency."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=max(stage.concurrency, 64))
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()
        end = t0 + stage.warmup_s + stage.duration_s
        samples: list[tuple[float, float, int]] = []
        counter = 0

        def body() -> dict:
            nonlocal counter
            counter += 1
            return {**bodies[counter % len(bodies)], "method": stage.method}

        if stage.mode == "closed":
            async def worker() -> None:
                while time.perf_counter() < end and len(samples) < stage.max_requests:
                    samples.append(await _post(client, url, body(), time.perf_counter(), stage.via))
            await asyncio.gather(*[worker() for _ in range(stage.concurrency)])
        elif stage.mode == "open":
            tasks = []
            n = int(min(stage.max_requests, stage.rate * (stage.warmup_s + stage.duration_s)))
            for i in range(n):
                scheduled = t0 + i / stage.rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                # latency from the scheduled send time
                tasks.append(asyncio.create_task(_post(client, url, body(), scheduled, stage.via)))
            samples = list(await asyncio.gather(*tasks))
        else:
            raise ValueError(f"stage mode must be closed or open, got {stage.mode!r}")
    return [s for s in samples if s[0] >= t0 + stage.warmup_s], len(samples)


def summarize(samples: list[tuple[float, float, int]], stage: Stage, capped: bool = False) -> dict[str, Any]:
    """One row per stage. ``duration_s`` is what was asked; ``ran_s`` what the measured
    requests spanned, and ``capped`` says when ``max_requests`` ended the stage early."""
    lat = np.array([s[1] for s in samples if s[2] == 200]) * 1000
    errors = sum(1 for s in samples if s[2] != 200)
    span = (max(s[0] + s[1] for s in samples) - min(s[0] for s in samples)) if samples else 0.0
    fields = asdict(stage)
    fields["ran_s"] = span
    fields["capped"] = capped
    if stage.mode == "closed":
        fields["rate"] = None  # closed loop: the concurrency sets the pace
    else:
        fields["concurrency"] = None  # open loop: the arrival rate sets the pace
    out = {**fields, "requests": len(samples), "errors": errors,
           "error_rate": errors / len(samples) if samples else 0.0,
           "qps": (len(samples) - errors) / span if span > 0 else 0.0}
    for q in (50, 90, 95, 99):
        out[f"p{q}_ms"] = float(np.percentile(lat, q)) if lat.size else float("nan")
    out["mean_ms"] = float(lat.mean()) if lat.size else float("nan")
    return out


def run_loadtest(url: str, stages: list[Stage], out: Path, allow_remote: bool = False) -> list[dict[str, Any]]:
    import urllib.error
    import urllib.request

    import pandas as pd

    check_loopback(url, allow_remote)
    check_stages(stages)
    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/examples?n=64", timeout=30) as response:
            bodies = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"{base}/examples answered HTTP {err.code}: not a cir-bench server?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"cannot reach {base} ({type(reason).__name__}: {reason}); is `cir-bench serve` "
                              "running there?") from None
    except ValueError:
        raise ConnectionError(f"{base}/examples did not answer JSON: not a cir-bench server?") from None
    if not bodies:
        raise RuntimeError(f"{base}/examples returned no request bodies")
    rows = []
    for stage in stages:
        samples, sent = asyncio.run(run_stage(f"{base}/search", bodies, stage))
        row = summarize(samples, stage, capped=sent >= stage.max_requests)
        if row["capped"]:
            print(f"loadtest: {stage.method} {stage.mode} stage stopped at --max-requests {stage.max_requests} "
                  f"after {row['ran_s']:.1f} s of the {stage.duration_s:g} s asked", file=sys.stderr)
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.json").write_text(json.dumps({"url": base, "stages": rows}, indent=2))
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "loadtest.csv", index=False)
    plot(pd.read_csv(out / "loadtest.csv"), out / "loadtest.png")
    return rows


def plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    frame = frame.assign(load=frame.apply(lambda r: f"c={r['concurrency']}" if r["mode"] == "closed"
                                          else f"{r['rate']:g}/s", axis=1))
    if "via" in frame and frame["via"].nunique() > 1:  # POST and GET side by side
        frame = frame.assign(method=frame["method"] + " (" + frame["via"].str.upper() + ")")
    long = frame.melt(id_vars=["method", "load"], value_vars=["p50_ms", "p99_ms"], var_name="percentile",
                      value_name="ms")
    sns.barplot(data=long, x="load", y="ms", hue="method", ax=axes[0], errorbar=None)
    axes[0].set_title("latency (p50 and p99 bars overlaid per method)")
    sns.barplot(data=frame, x="load", y="qps", hue="method", ax=axes[1], errorbar=None)
    axes[1].set_title("throughput (successful requests / s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_stages(stages: list[Stage]) -> None:
    """Every stage is runnable: a known method, concurrency >= 1, a positive finite rate and
    duration, warm-up >= 0, max_requests >= 1 (each error names the flag)."""
    from cir_bench.serving.requests import METHODS

    for st in stages:
        if st.method not in METHODS:
            raise ValueError(f"--methods: unknown method {st.method!r}; choose from {', '.join(METHODS)}")
        if st.via not in ("post", "get"):
            raise ValueError(f"--via: expected post and/or get, got {st.via!r}")
        if st.mode == "closed" and st.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {st.concurrency}")
        if st.mode == "open" and not (np.isfinite(st.rate) and st.rate > 0):
            raise ValueError(f"--rates must be > 0 requests/s, got {st.rate}")
        if not (np.isfinite(st.duration_s) and st.duration_s > 0):
            raise ValueError(f"--duration must be > 0 s, got {st.duration_s}")
        if not (np.isfinite(st.warmup_s) and st.warmup_s >= 0):
            raise ValueError(f"--warmup must be >= 0 s, got {st.warmup_s}")
        if st.max_requests < 1:
            raise ValueError(f"--max-requests must be >= 1, got {st.max_requests}")


def default_stages(methods: list[str], concurrency: list[int], rates: list[float], duration_s: float,
                   warmup_s: float, max_requests: int, via: tuple[str, ...] = ("post",)) -> list[Stage]:
    stages = [Stage(m, "closed", concurrency=c, duration_s=duration_s, warmup_s=warmup_s, max_requests=max_requests,
                    via=v) for m in methods for c in concurrency for v in via]
    stages += [Stage(m, "open", rate=r, duration_s=duration_s, warmup_s=warmup_s, max_requests=max_requests, via=v)
               for m in methods for r in rates for v in via]
    return stages


def stages_from_flags(methods: str, concurrency: str, rates: str | None, duration_s: float, warmup_s: float,
                      max_requests: int, via: str) -> list[Stage]:
    """``default_stages`` from the comma-separated text of ``cir-bench loadtest``'s flags."""
    def numbers(flag: str, text: str, kind=float) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None

    return default_stages([m.strip() for m in methods.split(",") if m.strip()],
                          numbers("--concurrency", concurrency, int), numbers("--rates", rates) if rates else [],
                          duration_s, warmup_s, max_requests, tuple(v.strip() for v in via.split(",") if v.strip()))

