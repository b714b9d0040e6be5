"""Shared fixtures: a session cache with SynthArt tiny and one tiny trained model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


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
        "student.overrides={epochs: 3}",
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
def local_ray():
    """``ray.init(num_cpus=2)`` once per test session."""
    ray = pytest.importorskip("ray")
    from cir_bench.distributed import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()
