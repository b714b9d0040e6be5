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
from cir_bench.distill import distill_student
from cir_bench.indexes import build_index
from cir_bench.methods import METHODS, SearchContext, get_method
from cir_bench.methods.backward import BackwardSearch
from cir_bench.methods.student import Student, StudentConfig
from cir_bench.metrics import build_eval_inputs, evaluate, find_twins, retrieved_similarity_at_k, summarize
from cir_bench.models import BACKBONES, load_checkpoint, save_checkpoint
from cir_bench.models.model import ConditionalRetrievalModel
from cir_bench.paths import default_cache_dir
from cir_bench.results import write_run
from cir_bench.store import EmbeddingStore, embedding_fingerprint, extract_embeddings, \
    file_sha256, load_or_extract
from cir_bench.train import resolve_input_size, seed_everything, train_model

CHECKPOINT_FORMAT = 1


def cache_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


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
                    {"history": history.epochs, "dataset": dataset.fingerprint(),
                     "input_size": resolve_input_size(cfg.model, dataset)})
    return TrainedModel(model, path, False, history.epochs, seconds)


def embed(cfg: RunConfig, dataset: Dataset, trained: TrainedModel, device: torch.device
          ) -> tuple[EmbeddingStore, bool]:
    spec = BACKBONES.get(cfg.model.backbone)
    size = resolve_input_size(cfg.model, dataset)
    prep = describe_transform(size, spec.mean, spec.std, dataset.square_resize)
    fp = embedding_fingerprint(file_sha256(trained.checkpoint), dataset.fingerprint(), prep)
    transform_args = {"input_size": size, "mean": spec.mean, "std": spec.std, "square": dataset.square_resize}
    if cfg.ray.embed or cfg.ray.address:
        from cir_bench.distributed import extract_embeddings_ray

        def extract() -> torch.Tensor:
            return extract_embeddings_ray(trained.checkpoint, dataset, transform_args, cfg.ray.actors,
                                          cfg.ray.gpus_per_actor, cfg.ray.batch_size, cfg.ray.address)
    else:
        def extract() -> torch.Tensor:
            return extract_embeddings(trained.model, dataset, build_transform(**transform_args), device,
                                      num_workers=cfg.train.num_workers)
    return load_or_extract(cache_dir_for(cfg), fp, extract, [it.id for it in dataset.items])


def make_queries(cfg: RunConfig, dataset: Dataset, properties: list[str]) -> tuple[QuerySet, Path]:
    """Build the query set once per (dataset, properties, query config, seed); reuse the file."""
    q = cfg.queries
    seed = cfg.seed if q.seed is None else q.seed
    settings = {k: v for k, v in dataclasses.asdict(q).items() if k != "sets"}
    key = _hash({"dataset": dataset.fingerprint(), "properties": properties, "queries": settings, "seed": seed})
    path = cache_dir_for(cfg) / "queries" / f"{dataset.name}-{'+'.join(properties)}-{key}.parquet"
    if path.exists():
        return QuerySet.load(path, dataset), path
    qs = build_query_set(dataset, properties, q.n_queries, seed, q.min_relevant, q.query_split, q.database_split,
                         min_jaccard=q.min_jaccard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    qs.save(tmp, dataset)
    os.replace(tmp, path)
    return qs, path


@dataclass
class Prepared:
    """Everything search needs: the dataset, the trained model (frozen), the store, and a
    search context over the database split."""

    dataset: Dataset
    trained: TrainedModel
    store: EmbeddingStore
    embeddings_reused: bool
    ctx: SearchContext
    device: torch.device


def prepare(cfg: RunConfig, progress: bool = True, dataset: Dataset | None = None) -> Prepared:
    """dataset -> train (or reuse) -> embed (or reuse) -> index, as one step."""
    device = pick_device(cfg.device)
    dataset = dataset or load_dataset(cfg)
    trained = train_or_load(cfg, dataset, device, progress=progress)
    trained.model.eval()
    for p in trained.model.parameters():
        p.requires_grad_(False)  # the heads are only ever differentiated w.r.t. z
    store, hit = embed(cfg, dataset, trained, device)
    database = dataset.split_indices(cfg.queries.database_split)
    index = build_index(cfg.eval.index, store.z, database, device,
                        **{"chunk": cfg.eval.search_batch, **cfg.eval.index_options})
    ctx = SearchContext(dataset, store, index, database, device, cfg.seed, cfg.eval.self_match, trained.model)
    return Prepared(dataset, trained, store, hit, ctx, device)


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset.name}"


@dataclass(frozen=True)
class MethodSpec:
    """One entry of the method list: a unique label, the registry name, its parameters."""

    label: str
    name: str
    params: dict[str, Any]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def method_specs(cfg: RunConfig) -> list[MethodSpec]:
    entries: list[Any] = list(cfg.eval.methods)
    for lam in cfg.eval.lambdas or []:
        entries.append({"method": "backward", "lam": float(lam)})
    specs: list[MethodSpec] = []
    for entry in entries:
        if isinstance(entry, str):
            name, label, params = entry, None, {}
        elif isinstance(entry, dict) and "method" in entry:
            params = dict(entry)
            name, label = params.pop("method"), params.pop("label", None)
        else:
            raise ValueError(f"eval.methods entry {entry!r} is neither a name nor a mapping with 'method'")
        METHODS.get(name)  # unknown names fail here, before any work
        if name == "backward":
            params = {"preset": cfg.search.preset, "lam": float(cfg.search.lam), **cfg.search.overrides, **params}
            label = label or f"backward[lam={_fmt(params['lam'])}]"
        specs.append(MethodSpec(label or name, name, params))
    seen: set[str] = set()
    unique = []
    for spec in specs:  # --lambda may repeat a lambda already listed
        if spec.label not in seen:
            seen.add(spec.label)
            unique.append(spec)
    return unique


def teacher(cfg: RunConfig) -> BackwardSearch:
    return BackwardSearch(cfg.search.preset, lam=float(cfg.search.lam), **cfg.search.overrides)


def teacher_label(cfg: RunConfig) -> str:
    return f"backward[lam={_fmt(float(cfg.search.lam))}]"


def distil_or_load(cfg: RunConfig, dataset: Dataset, trained: TrainedModel, store: EmbeddingStore,
                   properties: list[str], device: torch.device, progress: bool = True) -> tuple[Student, dict]:
    """The student for one property set, cached by (checkpoint, store, teacher, config, seed)."""
    student_cfg = StudentConfig(**{**cfg.student.overrides,
                                   **({"hidden": tuple(cfg.student.overrides["hidden"])}
                                      if "hidden" in cfg.student.overrides else {})})
    key = _hash({"checkpoint": file_sha256(trained.checkpoint), "store": store.fingerprint, "props": properties,
                 "teacher": teacher(cfg).params(), "student": dataclasses.asdict(student_cfg), "seed": cfg.seed})
    path = cache_dir_for(cfg) / "students" / f"{key}.pt"
    if path.exists():
        student = Student.load(path, device)
        return student, {"path": str(path), "reused": True}
    train_idx = torch.as_tensor(dataset.split_indices("train"))
    t0 = time.perf_counter()
    student, history = distill_student(
        trained.model.heads, store.z[train_idx], properties,
        [dataset.property(p).num_classes for p in properties], teacher(cfg), student_cfg, cfg.seed, device,
        progress=progress)
    seconds = time.perf_counter() - t0
    student.save(path, {"history": history, "seconds": seconds})
    return student, {"path": str(path), "reused": False, "seconds": seconds, "final_mse": history[-1]["mse"]}


def run(cfg: RunConfig, progress: bool = True, log=print) -> Path:
    """The whole pipeline; returns the run directory holding the result files."""
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    specs = method_specs(cfg)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    dataset = load_dataset(cfg)
    timings["dataset_s"] = time.perf_counter() - t0
    query_sets = cfg.queries.sets or dataset.default_query_sets()
    for props in query_sets:
        for p in props:
            dataset.property(p)  # unknown property: fail before training
    log(f"dataset {dataset.name}: {len(dataset)} items, properties "
        + ", ".join(f"{p.name}({p.num_classes})" for p in dataset.properties) + f"; device {device}")

    t0 = time.perf_counter()
    prepared = prepare(cfg, progress, dataset)
    trained, store, hit, ctx = prepared.trained, prepared.store, prepared.embeddings_reused, prepared.ctx
    database = ctx.database
    timings["train_embed_s"] = time.perf_counter() - t0
    final = trained.history[-1] if trained.history else {}
    log(("reused checkpoint " if trained.reused else "trained ") + str(trained.checkpoint))
    if final:
        log("accuracy " + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if "acc" in k))
    log(("reused" if hit else "extracted") + f" embeddings {store.fingerprint} ({tuple(store.z.shape)})")

    ids = np.array([it.id for it in dataset.items])
    result_frames, metric_rows, query_info, student_info = [], [], {}, {}
    methods: dict[str, Any] = {}  # one instance per label across query sets (setup runs once)
    for props in query_sets:
        set_name = "+".join(props)
        queries, query_file = make_queries(cfg, dataset, list(props))
        query_info[set_name] = {"file": str(query_file), "n": len(queries)}
        twins = find_twins(dataset, queries, database)
        log(f"query set {set_name}: {len(queries)} queries, database {len(database)} items "
            f"(split '{cfg.queries.database_split}'), self-match {cfg.eval.self_match}")
        if any(s.name == "student" for s in specs):
            t0 = time.perf_counter()
            student, info = distil_or_load(cfg, dataset, trained, store, list(props), device, progress)
            ctx.cache.setdefault("students", {})[tuple(props)] = student
            student_info[set_name] = {**info, "teacher": teacher_label(cfg)}
            timings[f"distil_{set_name}_s"] = time.perf_counter() - t0
        qframe = queries.to_frame(dataset)
        conditions = [queries.conditions_json(dataset, q) for q in range(len(queries))]
        rankings = {}
        for spec in specs:
            method = methods.get(spec.label) or get_method(spec.name, **spec.params)
            methods[spec.label] = method
            t_setup = time.perf_counter()
            method.setup(ctx)  # e.g. a baseline's gallery: done once, not counted per query
            setup_s = time.perf_counter() - t_setup
            t0 = time.perf_counter()
            ranking = method.search(ctx, queries, cfg.eval.k)
            elapsed = time.perf_counter() - t0
            rankings[spec.label] = ranking
            inputs = build_eval_inputs(dataset, queries, ranking.positions, database, cfg.eval.self_match, twins)
            per_query = evaluate(inputs, ks=(cfg.eval.k,))
            summary: dict[str, Any] = {"query_set": set_name, "method": spec.label, "name": spec.name,
                                       "n_queries": len(queries), **summarize(per_query)}
            if "iterations" in ranking.extras:
                it = ranking.extras["iterations"].astype(float)
                summary.update(mean_iterations=float(it.mean()), std_iterations=float(it.std()),
                               satisfied_rate=float(ranking.extras["satisfied"].mean()))
            if spec.name == "student" and teacher_label(cfg) in rankings:
                sim = retrieved_similarity_at_k(rankings[teacher_label(cfg)].positions, ranking.positions,
                                                cfg.eval.k)
                per_query[f"retrieved_similarity_at_{cfg.eval.k}"] = sim
                summary[f"retrieved_similarity_at_{cfg.eval.k}"] = float(sim.mean())
            summary["ms_per_query"] = 1000.0 * elapsed / max(len(queries), 1)
            summary["setup_s"] = setup_s
            summary["params"] = json.dumps(spec.params, sort_keys=True)
            metric_rows.append(summary)
            frame = qframe.copy()
            frame.insert(0, "method", spec.label)
            frame.insert(0, "query_set", set_name)
            frame["conditions"] = conditions
            frame["ranked_ids"] = [ids[row].tolist() for row in ranking.positions]
            frame["scores"] = [row.astype(float).tolist() for row in ranking.scores]
            for key, values in ranking.extras.items():
                frame[key] = values
            for col in per_query.columns:
                frame[f"metric_{col}"] = per_query[col].to_numpy()
            result_frames.append(frame)
            log(f"  {spec.label:<24} precision@{cfg.eval.k}={summary[f'precision_at_{cfg.eval.k}']:.3f} "
                f"({summary['ms_per_query']:.2f} ms/query)")

    items = dataset.to_frame()
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_items": len(dataset),
                    "root": cfg.dataset.root, "report": dataset.report,
                    "properties": {p.name: list(p.classes) for p in dataset.properties}},
        "policies": {"self_match": cfg.eval.self_match, "ties": "score desc, then item id asc",
                     "averaging": "micro (mean over queries)", "relevance": "ground-truth label == condition "
                     "for every conditioned property", "database_split": cfg.queries.database_split},
        "checkpoint": {"path": str(trained.checkpoint), "sha256": file_sha256(trained.checkpoint),
                       "reused": trained.reused, "train_seconds": trained.seconds},
        "training_history": trained.history,
        "embeddings": {"fingerprint": store.fingerprint, "reused": hit, "dim": int(store.z.shape[1])},
        "queries": query_info,
        "methods": {s.label: {"name": s.name, "params": s.params,
                              **({"setup": methods[s.label].setup_info()} if s.label in methods
                                 and methods[s.label].setup_info() else {})} for s in specs},
        "students": student_info,
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    write_run(out, pd.concat(result_frames, ignore_index=True), pd.DataFrame(metric_rows), items, manifest)
    return out
