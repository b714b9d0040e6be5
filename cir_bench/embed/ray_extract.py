"""Embedding extraction with Ray Data: ``map_batches`` over an actor pool, one model copy
per actor, GPUs when asked for and present. The result is the same (N, d) tensor as the
in-process path, so it lands in the same cached embedding store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cir_bench.data.base import Dataset


class _EmbedActor:
    """One model copy per Ray actor; maps {"index"} batches to {"index", "z"}."""

    def __init__(self, checkpoint: str, dataset: Dataset, transform_args: dict[str, Any]) -> None:
        from cir_bench.data.transforms import build_transform
        from cir_bench.models import load_checkpoint

        torch.set_num_threads(1)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_checkpoint(checkpoint, self.device)
        self.dataset = dataset
        self.transform = build_transform(**transform_args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = batch["index"]
        x = torch.stack([self.transform(self.dataset.load_image(int(i))) for i in idx]).to(self.device)
        with torch.no_grad():
            z = self.model.embed(x).float().cpu().numpy()
        return {"index": idx, "z": z}


def extract_embeddings_ray(checkpoint: Path, dataset: Dataset, transform_args: dict[str, Any], actors: int = 2,
                           gpus_per_actor: float = 0.0, batch_size: int = 64, address: str | None = None
                           ) -> torch.Tensor:
    import ray

    from cir_bench.cluster import connect

    connect(address)
    ds = ray.data.from_items([{"index": i} for i in range(len(dataset))])
    out = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "dataset": dataset, "transform_args": transform_args},
        batch_size=batch_size, concurrency=max(1, actors), num_cpus=1, num_gpus=gpus_per_actor,
        batch_format="numpy",
    )
    index_parts, z_parts = [], []
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        index_parts.append(np.asarray(batch["index"]))
        z_parts.append(np.stack(batch["z"]) if batch["z"].dtype == object else np.asarray(batch["z"]))
    index = np.concatenate(index_parts)
    z = np.concatenate(z_parts)
    order = np.argsort(index)
    if not np.array_equal(index[order], np.arange(len(dataset))):
        raise RuntimeError("Ray Data extraction lost or duplicated items")
    return torch.from_numpy(z[order]).float()
