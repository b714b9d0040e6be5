"""The one-way chain: dataset -> train -> embed -> query set -> search -> score -> results.

Each step is a function the CLI, Ray Tune and the tests call; ``run`` composes them.
Expensive steps are cached by content: the checkpoint by (model config, train config,
dataset fingerprint, seed), the embeddings by (checkpoint hash, dataset fingerprint,
preprocessing), the query set by (dataset fingerprint, query config, seed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cir_bench.config import RunConfig
from cir_bench.data import get_dataset
from cir_bench.data.base import Dataset
from cir_bench.data.queries import QuerySet, build_query_set
from cir_bench.data.transforms import build_transform, describe_transform
from cir_bench.device import pick_device
from cir_bench.methods import SearchContext, get_method
from cir_bench.metrics import build_eval_inputs, evaluate, find_twins, summarize
from cir_bench.models import BACKBONES, load_checkpoint, save_checkpoint
from cir_bench.models.model import ConditionalRetrievalModel
from cir_bench.results import write_run
from cir_bench.store import CosineIndex, EmbeddingStore, embedding_fingerprint, extract_embeddings, \
    file_sha256, load_or_extract
from cir_bench.train import resolve_input_size, seed_everything, train_model

CHECKPOINT_FORMAT = 1


def cache_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("CIR_BENCH_CACHE") or Path.home() / ".cache" / "cir-bench")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_dataset(cfg: RunConfig) -> Dataset:
    return get_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.options, cache_dir_for(cfg))


@dataclass
class TrainedModel:
    model: ConditionalRetrievalModel
    checkpoint: Path
    reused: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def checkpoint_key(cfg: RunConfig, dataset: Dataset) -> str:
    return _hash({
        "format": CHECKPOINT_FORMAT,
        "model": dataclasses.asdict(cfg.model),
        "train": dataclasses.asdict(cfg.train),
        "dataset": dataset.fingerprint(),
        "seed": cfg.seed,
        "input_size": resolve_input_size(cfg.model, dataset),
    })


def train_or_load(cfg: RunConfig, dataset: Dataset, device: torch.device, progress: bool = True) -> TrainedModel:
    """Reuse the cached checkpoint of an identical config, else train and cache it."""
    path = cache_dir_for(cfg) / "checkpoints" / f"{checkpoint_key(cfg, dataset)}.pt"
    if path.exists():
        model, payload = load_checkpoint(path, device)
        return TrainedModel(model, path, True, list(payload["extra"].get("history", [])))
    t0 = time.perf_counter()
    model, history = train_model(dataset, cfg.model, cfg.train, device, cfg.seed, progress=progress)
    seconds = time.perf_counter() - t0
    save_checkpoint(path, model, cfg.model, {p.name: p.classes for p in dataset.properties},
                    {"history": history.epochs, "dataset": dataset.fingerprint(), "seconds": seconds,
                     "input_size": resolve_input_size(cfg.model, dataset)})
    return TrainedModel(model, path, False, history.epochs, seconds)


def embed(cfg: RunConfig, dataset: Dataset, trained: TrainedModel, device: torch.device
          ) -> tuple[EmbeddingStore, bool]:
    spec = BACKBONES.get(cfg.model.backbone)
    size = resolve_input_size(cfg.model, dataset)
    prep = describe_transform(size, spec.mean, spec.std)
    fp = embedding_fingerprint(file_sha256(trained.checkpoint), dataset.fingerprint(), prep)
    transform = build_transform(size, spec.mean, spec.std)
    return load_or_extract(
        cache_dir_for(cfg), fp,
        lambda: extract_embeddings(trained.model, dataset, transform, device, num_workers=cfg.train.num_workers),
        [it.id for it in dataset.items],
    )


def make_queries(cfg: RunConfig, dataset: Dataset) -> tuple[QuerySet, Path]:
    """Build the query set once per (dataset, query config, seed) and reuse the saved file."""
    q = cfg.queries
    seed = cfg.seed if q.seed is None else q.seed
    key = _hash({"dataset": dataset.fingerprint(), "queries": dataclasses.asdict(q), "seed": seed})
    path = cache_dir_for(cfg) / "queries" / f"{dataset.name}-{'+'.join(q.properties)}-{key}.parquet"
    if path.exists():
        return QuerySet.load(path, dataset), path
    qs = build_query_set(dataset, q.properties, q.n_queries, seed, q.min_relevant, q.query_split, q.database_split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    qs.save(tmp, dataset)
    os.replace(tmp, path)
    return qs, path


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset.name}"


def run(cfg: RunConfig, progress: bool = True, log=print) -> Path:
    """The whole pipeline; returns the run directory holding the result files."""
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    dataset = load_dataset(cfg)
    timings["dataset_s"] = time.perf_counter() - t0
    log(f"dataset {dataset.name}: {len(dataset)} items, properties "
        + ", ".join(f"{p.name}({p.num_classes})" for p in dataset.properties) + f"; device {device}")

    t0 = time.perf_counter()
    trained = train_or_load(cfg, dataset, device, progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    final = trained.history[-1] if trained.history else {}
    log(("reused checkpoint " if trained.reused else "trained ") + str(trained.checkpoint))
    if final:
        log("accuracy " + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if "acc" in k))

    t0 = time.perf_counter()
    store, hit = embed(cfg, dataset, trained, device)
    timings["embed_s"] = time.perf_counter() - t0
    log(("reused" if hit else "extracted") + f" embeddings {store.fingerprint} ({tuple(store.z.shape)})")

    queries, query_file = make_queries(cfg, dataset)
    database = dataset.split_indices(cfg.queries.database_split)
    index = CosineIndex(store.z, database, device, chunk=cfg.eval.search_batch)
    ctx = SearchContext(dataset, store, index, database, device, cfg.seed, cfg.eval.self_match, trained.model)
    twins = find_twins(dataset, queries, database)
    log(f"{len(queries)} queries on {'+'.join(queries.properties)}, database {len(database)} items "
        f"(split '{cfg.queries.database_split}'), self-match {cfg.eval.self_match}")

    result_frames, metric_rows, method_params = [], [], {}
    qframe = queries.to_frame(dataset)
    ids = np.array([it.id for it in dataset.items])
    for name in cfg.eval.methods:
        method = get_method(name)
        t0 = time.perf_counter()
        ranking = method.search(ctx, queries, cfg.eval.k)
        elapsed = time.perf_counter() - t0
        inputs = build_eval_inputs(dataset, queries, ranking.positions, database, cfg.eval.self_match, twins)
        per_query = evaluate(inputs, ks=(cfg.eval.k,))
        summary = {"method": name, "n_queries": len(queries), **summarize(per_query),
                   "ms_per_query": 1000.0 * elapsed / max(len(queries), 1)}
        metric_rows.append(summary)
        method_params[name] = method.params()
        frame = qframe.copy()
        frame.insert(0, "method", name)
        frame["conditions"] = [queries.conditions_json(dataset, q) for q in range(len(queries))]
        frame["ranked_ids"] = [ids[row].tolist() for row in ranking.positions]
        frame["scores"] = [row.astype(float).tolist() for row in ranking.scores]
        for key, values in ranking.extras.items():
            frame[key] = values
        for col in per_query.columns:
            frame[f"metric_{col}"] = per_query[col].to_numpy()
        result_frames.append(frame)

    items = dataset.to_frame()
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_items": len(dataset),
                    "properties": {p.name: list(p.classes) for p in dataset.properties}},
        "policies": {"self_match": cfg.eval.self_match, "ties": "score desc, then item id asc",
                     "averaging": "micro (mean over queries)", "relevance": "ground-truth label == condition "
                     "for every conditioned property", "database_split": cfg.queries.database_split},
        "checkpoint": {"path": str(trained.checkpoint), "sha256": file_sha256(trained.checkpoint),
                       "reused": trained.reused, "train_seconds": trained.seconds},
        "training_history": trained.history,
        "embeddings": {"fingerprint": store.fingerprint, "reused": hit, "dim": int(store.z.shape[1])},
        "queries": {"file": str(query_file), "n": len(queries), "properties": queries.properties},
        "methods": method_params,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    write_run(out, pd.concat(result_frames, ignore_index=True), pd.DataFrame(metric_rows), items, manifest)
    return out
