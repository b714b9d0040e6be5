"""`--address` against a real two-node Ray cluster on this machine (head + one worker node, 1 CPU
each, token authentication as `ray start` sets it up): `cir-bench run` with Ray Data extraction,
`cir-bench tune` with two trials, `cir-bench serve` deploy / answer / stop, a client without the
token, and a node that cannot see the cache folder. Every command runs as a user runs it (the CLI
in a subprocess, HOME holding the cluster's token)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from .conftest import tiny_overrides
from .equivalence import normalised_distance
from .ray_cluster import LocalCluster, free_port
from .test_serve import serve_config

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    c = LocalCluster(root / "home")
    try:
        c.start()
        c.add_node("worker")
        c.wait_for_nodes(2)
        yield c
    except Exception:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode-cache")


def cli(cluster: LocalCluster, *args: str, timeout: float = 300, home: Path | None = None
        ) -> subprocess.CompletedProcess:
    env = cluster.env(**({"HOME": str(home)} if home else {}))
    return subprocess.run([sys.executable, "-m", "cir_bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def tiny_flags(cache: Path) -> list[str]:
    flags: list[str] = []
    for o in tiny_overrides(cache):
        flags += ["--set", o]
    return flags


def test_a_client_without_the_token_gets_one_line_in_seconds(cluster, tmp_path):
    empty_home = tmp_path / "no-token-home"
    empty_home.mkdir()
    t0 = time.perf_counter()
    done = cli(cluster, "tune", "quick", "--address", cluster.address, "--storage-path", str(tmp_path / "t"),
               "--no-progress", home=empty_home, timeout=60)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"cir-bench: error: --address {cluster.address}: the cluster answers but refuses")
    assert "RAY_AUTH_MODE=token" in last and "auth_token" in last
    assert "Traceback" not in done.stderr
    assert elapsed < 10, elapsed


def test_a_client_with_another_clusters_token_is_told_so(cluster, tmp_path):
    home = tmp_path / "other-token-home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0" * 32)  # not this cluster's token
    t0 = time.perf_counter()
    done = cli(cluster, "run", "--address", cluster.address, "--no-progress", home=home, timeout=60)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"cir-bench: error: --address {cluster.address}: the cluster refuses the token from "
                           f"{home / '.ray' / 'auth_token'}"), last
    assert "Traceback" not in done.stderr and elapsed < 10, elapsed


def test_run_extracts_embeddings_on_the_cluster_equal_to_in_process(cluster, shared_cache, tmp_path):
    from cir_bench.config import load_config
    from cir_bench.models import load_checkpoint
    from cir_bench.pipeline import embed, load_dataset
    from cir_bench.pipeline.steps import TrainedModel

    out = tmp_path / "run"
    done = cli(cluster, "run", "--address", cluster.address, *tiny_flags(shared_cache), "--methods",
               "knn,backward", "--out", str(out), "--no-report", "--no-progress")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"Ray cluster {cluster.address}: 2 node(s)" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embeddings"]["reused"] is False and manifest["config"]["ray"]["address"] == cluster.address
    assert len(manifest["cluster"]["nodes"]) == 2
    assert not list((shared_cache / ".cluster-check").iterdir())  # the check cleans up its markers

    # the same checkpoint, embedded in this process (another cache, so nothing is reused)
    cfg = load_config(None, tiny_overrides(tmp_path / "local-cache"))
    dataset = load_dataset(cfg)
    model, _ = load_checkpoint(manifest["checkpoint"]["path"])
    local, hit = embed(cfg, dataset, TrainedModel(model, Path(manifest["checkpoint"]["path"]), True),
                       torch.device("cpu"))
    assert not hit and local.fingerprint == manifest["embeddings"]["fingerprint"]
    from cir_bench.embed import EmbeddingStore, store_path

    remote = EmbeddingStore.load(store_path(shared_cache, manifest["embeddings"]["fingerprint"]))
    assert list(remote.ids) == list(local.ids)
    # other batches on other processes (1 thread per actor): float32 sums in another order,
    # ~1e-4 of the embedding's scale at most (as tests/test_distributed.py derives)
    scale = float(local.z.abs().max())
    np.testing.assert_allclose(remote.z.numpy(), local.z.numpy(), rtol=1e-4, atol=1e-4 * scale)
    assert float(normalised_distance(remote.z, local.z).max()) <= 1e-4
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["method"]) >= {"knn"} and len(results) > 0


def test_tune_runs_two_trials_on_both_nodes(cluster, shared_cache, tmp_path):
    exp = {
        "name": "two-nodes",
        "base": {"dataset": {"name": "synthart", "options": {"preset": "tiny"}},
                 "train": {"epochs": 2, "batch_size": 32},
                 "queries": {"sets": [["style"]], "n_queries": 20, "min_relevant": 2}, "device": "cpu"},
        "grid": {"model.embed_dim": [32, 48]},
        "lambdas": [0.0, 0.01],
        "calibration": None,
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 0,
    }
    config = tmp_path / "two-nodes.yaml"
    config.write_text(yaml.safe_dump(exp))
    storage = tmp_path / "tune"
    done = cli(cluster, "tune", str(config), "--address", cluster.address, "--storage-path", str(storage),
               "--cache-dir", str(shared_cache), "--no-progress")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    tidy = pd.read_parquet(storage / "two-nodes" / "report" / "tune_results.parquet")
    assert set(tidy["model.embed_dim"]) == {32, 48} and len(tidy) == 2 * 2
    # 1 CPU per node, 1 CPU per trial, both trials start together: Ray puts one on each node
    assert tidy.groupby("model.embed_dim")["node_id"].nunique().eq(1).all()
    assert tidy["node_id"].nunique() == 2, tidy[["model.embed_dim", "node_id"]]
    assert (storage / "two-nodes" / "report" / "table.md").is_file()


def test_serve_deploys_answers_and_stops(cluster, shared_cache, tmp_path):
    port = free_port()
    config = serve_config(tmp_path / "serve.yaml", teacher={"compile": False})
    done = cli(cluster, "serve", "--address", cluster.address, "--port", str(port), *tiny_flags(shared_cache),
               "--no-progress", "--serve-config", config)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # the serve config's ray_serve switches cannot reach a running cluster: said, with the fix
    assert "Serve's switches (ray_serve in the serve config) are the ones `ray start` was given" in done.stdout
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:  # the proxy may take a moment after the deploy returns
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "serve on the cluster never became healthy"
            time.sleep(0.5)
        styles = httpx.get(f"{url}/properties", timeout=10).json()["style"]
        item = httpx.get(f"{url}/items?limit=1", timeout=10).json()["items"][0]["id"]
        for method in ("knn", "student", "teacher"):
            body = {"item_id": item, "conditions": {"style": styles[1]}, "method": method, "k": 5}
            r = httpx.post(f"{url}/search", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 5, r.text
    finally:
        stopped = cli(cluster, "serve", "--stop", "--address", cluster.address, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=5)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_node_that_cannot_see_the_cache_is_named(cluster, shared_cache, tmp_path):
    scratch = tmp_path / "mount-probe"
    scratch.mkdir()
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs none {scratch}"], capture_output=True)
    if probe.returncode != 0:  # needs root (CAP_SYS_ADMIN) in this container
        pytest.skip(f"cannot mount in a new mount namespace here: {probe.stderr.decode().strip()[:200]}")
    # a third node whose view of the cache path is an empty tmpfs: a node without the shared mount
    mask = f"mount -t tmpfs none {shared_cache} && exec \"$@\""
    cluster.add_node("masked", wrap=["unshare", "--mount", "sh", "-c", mask, "sh"])
    try:
        cluster.wait_for_nodes(3)
        t0 = time.perf_counter()
        done = cli(cluster, "run", "--address", cluster.address, *tiny_flags(shared_cache), "--methods", "knn",
                   "--out", str(tmp_path / "run"), "--no-report", "--no-progress", timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        cluster.stop_node(-1)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"cir-bench: error: cache folder {shared_cache.resolve()} is not shared with node "), last
    assert "cannot read" in last and "--cache-dir" in last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # failed before any work
    assert elapsed < 30, elapsed
