"""A composed-image-retrieval baseline (baselines/ adapters) as a search method: the same
queries, database, self-match policy, tie-break and metric engine as every other method.

``setup`` builds the adapter from its weights and embeds the database with it (cached under
the adapter's ``cache_key`` + the dataset fingerprint); ``search`` then encodes each query's
reference image with its condition text and ranks the database. The exact prompts fed to
the model are returned per query (``extras["prompt"]``) and so stored with the results.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from cir_bench.data.queries import QuerySet
from cir_bench.search.base import Ranking, SearchContext, SearchMethod
from cir_bench.index import rank_scores
from cir_bench.index.base import result_size
from cir_bench.paths import cache_root, load_cached, save_torch


_COMPOSERS: dict[tuple, Any] = {}


def load_composer(baseline: str, weights_dir: str | None, device: str, batch_size: int = 32,
                  options: dict[str, Any] | None = None) -> Any:
    """The adapter built from its weights, once per process: ``cir-bench compare`` builds every
    adapter before any pipeline work (a file with the wrong keys or shapes fails there, not
    after training), and the search method then finds it here."""
    import json

    from cir_bench_baselines import get_composer

    key = (baseline, str(weights_dir), str(device), int(batch_size), json.dumps(options or {}, sort_keys=True))
    if key not in _COMPOSERS:
        _COMPOSERS[key] = get_composer(baseline, weights_dir, device=str(device), batch_size=batch_size,
                                       **(options or {}))
    return _COMPOSERS[key]


def release_composers() -> None:
    """Drop the adapters built by ``load_composer`` (their weights can take GBs)."""
    _COMPOSERS.clear()


class BaselineSearch(SearchMethod):
    name = "baseline"
    needs_images = True

    def __init__(self, baseline: str, template: str = "T1", weights_dir: str | None = None,
                 cache_dir: str | None = None, batch_size: int = 32, options: dict[str, Any] | None = None) -> None:
        from cir_bench_baselines.condition_text import TEMPLATES

        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        self.baseline, self.template = baseline, template
        self.weights_dir, self.cache_dir = weights_dir, cache_dir
        self.batch_size, self.options = batch_size, dict(options or {})
        self.composer = None
        self.gallery: torch.Tensor | None = None
        self.info: dict[str, Any] = {}

    def params(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "template": self.template, **({"options": self.options} if self.options else {})}

    def setup(self, ctx: SearchContext) -> None:
        if self.composer is not None:
            return
        t0 = time.perf_counter()
        self.composer = load_composer(self.baseline, self.weights_dir, str(ctx.device), self.batch_size, self.options)
        key = f"{self.composer.cache_key()}-{ctx.dataset.fingerprint()}"
        path = cache_root(self.cache_dir) / "baselines" / f"{key}.pt"
        self.composer.use_cache(path.parent)
        ids = [ctx.dataset.items[p].id for p in ctx.database]
        gallery = None
        data = load_cached(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if data is not None and data["ids"] == ids:
            gallery = data["z"]
        reused = gallery is not None
        if gallery is None:
            images = [ctx.dataset.load_image(int(p)) for p in ctx.database]
            gallery = self.composer.encode_gallery(images)
            save_torch({"ids": ids, "z": gallery}, path)
        self.gallery = gallery
        self.info = {"gallery_cache": str(path), "gallery_reused": reused, "setup_s": time.perf_counter() - t0,
                     "weights": self.composer.weights, "notes": list(self.composer.notes),
                     "describe": self.composer.describe(), "cache_key": key}

    def conditions(self, ctx: SearchContext, queries: QuerySet) -> list[list[tuple[str, str]]]:
        return [[(p, ctx.dataset.property(p).classes[int(queries.conditions[q, m])])
                 for m, p in enumerate(queries.properties)] for q in range(len(queries))]

    def search(self, ctx: SearchContext, queries: QuerySet, k: int) -> Ranking:
        self.setup(ctx)
        prompts = self.composer.condition_text(ctx.dataset.name, self.conditions(ctx, queries), self.template)
        images = [ctx.dataset.load_image(int(p)) for p in queries.positions]
        sim = self.composer.query_scores(images, prompts, self.gallery)
        exclude = ctx.exclude(queries)
        idx, scores = rank_scores(sim, result_size(k, sim.shape[1], exclude),
                                  None if exclude is None else ctx.index.local(exclude))
        positions = np.asarray(ctx.database)[idx.numpy()]
        return Ranking(positions, scores.numpy(), {"prompt": np.array(prompts, dtype=object)})
