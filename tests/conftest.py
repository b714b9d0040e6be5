"""Shared fixtures: a session cache with SynthArt tiny and one tiny trained model, tiny
author-format baseline weights, a network guard, local Ray; and helpers for comparing
results the way a user does (tests/equivalence.py)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

# the machines have 2 cores; OMP_NUM_THREADS=1 runs the suite single-threaded (tests must pass both ways)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
# Serve's proxy must answer its readiness check within 5 s by default; on 2 busy cores it may
# not, and Serve then kills it. Ray's workers inherit this from the process that starts Ray.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
# compiled kernels outlive a test session, as a user's do (cir_bench.paths.kernel_cache_dir keys
# them by torch version and CPU capability, so suites run under other ATEN_CPU_CAPABILITY values
# one after another share this folder safely)
os.environ.setdefault("CIR_BENCH_KERNEL_CACHE", os.path.join(__import__("tempfile").gettempdir(),
                                                             f"cir-bench-test-kernels-{os.getuid()}"))

# The user's weights root, read before the session cache fixture points $CIR_BENCH_CACHE (and
# with it the default weights folder) at a temporary folder: real-weight tests look here.
USER_WEIGHTS_ROOT = Path(os.environ.get("CIR_BENCH_WEIGHTS") or Path(os.environ.get("CIR_BENCH_CACHE")
                         or Path.home() / ".cache" / "cir-bench").expanduser() / "weights")


@pytest.fixture(autouse=True)
def _serve_switches_restored():
    """Serve's switches live in the environment (cir-bench serve sets them before Ray starts):
    whatever a test sets there in this process must not reach the Ray and the servers of the
    tests after it (an HAProxy where a test expects Ray's proxy, side ports taken twice)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    yield
    for key in [k for k in os.environ if k.startswith("RAY_SERVE_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cir-bench-cache")
    os.environ["CIR_BENCH_CACHE"] = str(path)  # nothing a test does touches ~/.cache
    return path


@pytest.fixture(scope="session")
def tiny(cache_dir: Path):
    from cir_bench.data.synthart import SynthArt

    return SynthArt.load("tiny", cache_dir=cache_dir)


def tiny_overrides(cache_dir: Path, out: Path | None = None) -> list[str]:
    ov = [
        "dataset.options={preset: tiny}",
        f"cache_dir={cache_dir}",
        "train.epochs=2",
        "train.batch_size=32",
        "queries.n_queries=40",
        "queries.sets=[[style], [style, shape]]",
        "queries.min_relevant=2",  # tiny has ~2 test items per (style, shape) pair
        "student.epochs=3",
        # the λ curve: a short grid and the preset only (the converged solver's tail costs minutes
        # on this model); tests/test_converged.py runs both
        "eval.lambda_curve=[0.0, 0.0001, 0.001, 0.01]",
        "eval.lambda_curve_solvers=[preset]",
        "device=cpu",
    ]
    if out is not None:
        ov.append(f"out={out}")
    return ov


@pytest.fixture(scope="session")
def tiny_config(cache_dir: Path):
    from cir_bench.config import load_config

    return load_config(None, tiny_overrides(cache_dir))


@pytest.fixture(scope="session")
def tiny_trained(tiny_config, tiny):
    from cir_bench.pipeline import train_or_load

    return train_or_load(tiny_config, tiny, torch.device("cpu"), progress=False)


@pytest.fixture(scope="session")
def tiny_search(tiny, tiny_config, tiny_trained):
    """(dataset, embedding store, model in eval mode with frozen weights) for search tests."""
    from cir_bench.pipeline import embed

    store, _ = embed(tiny_config, tiny, tiny_trained, torch.device("cpu"))
    model = tiny_trained.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tiny, store, model


@pytest.fixture(scope="session")
def local_ray():
    """``ray.init(num_cpus=2)`` once per test session."""
    ray = pytest.importorskip("ray")
    from cir_bench.cluster import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def no_network():
    """Any connection attempt fails the test: adapters and compare read local files only."""
    real = socket.socket.connect

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    socket.socket.connect = refuse
    yield
    socket.socket.connect = real


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random weights in every baseline author's format (tests/tiny_weights.py)."""
    pytest.importorskip("open_clip")
    from .tiny_weights import write_tiny_weights

    root = tmp_path_factory.mktemp("tiny-weights")
    write_tiny_weights(root)
    return root


def queries_from_requests(parsed):
    """The QuerySet equivalent of parsed item-id requests (to compare with the offline methods)."""
    from cir_bench.data.queries import QuerySet

    return QuerySet(list(parsed[0].properties), np.array([p.position for p in parsed]),
                    np.array([list(p.classes) for p in parsed]))
