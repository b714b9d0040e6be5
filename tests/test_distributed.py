"""Ray Data embedding extraction equals the in-process path (local Ray, 2 CPUs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from .equivalence import normalised_distance

ray = pytest.importorskip("ray")


def test_ray_data_extraction_matches_in_process(local_ray, tiny, tiny_trained):
    from cir_bench.data.transforms import build_transform
    from cir_bench.embed.ray_extract import extract_embeddings_ray
    from cir_bench.models import BACKBONES
    from cir_bench.embed import extract_embeddings

    spec = BACKBONES.get("small_cnn")
    args = {"input_size": 64, "mean": spec.mean, "std": spec.std, "square": False}
    local = extract_embeddings(tiny_trained.model, tiny, build_transform(**args), torch.device("cpu"))
    remote = extract_embeddings_ray(tiny_trained.checkpoint, tiny, args, actors=2, batch_size=32)
    assert remote.shape == local.shape
    # batches of 32 on two actors vs 256 in-process: float32 sums in another order. A conv
    # layer sums ~10^3 terms, so rounding is ~1e-4 of the embedding's scale, not bit-exact.
    scale = float(local.abs().max())
    np.testing.assert_allclose(remote.numpy(), local.numpy(), rtol=1e-4, atol=1e-4 * scale)
    assert float(normalised_distance(remote, local).max()) <= 1e-4


def test_run_with_ray_embed(local_ray, tmp_path):
    import json

    from cir_bench.config import load_config
    from cir_bench.pipeline import run

    from .conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path / "cache", tmp_path / "out")
                      + ["ray.embed=true", "eval.methods=[knn]", "queries.sets=[[style]]"])
    out = run(cfg, progress=False, log=lambda *_: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embeddings"]["reused"] is False and manifest["config"]["ray"]["embed"] is True
