"""The cached steps of the chain, as the drivers (run, compare, tune, serve) call them:
dataset -> train (or reuse) -> embed (or reuse) -> index, the query sets, the students.

Expensive steps are cached by content: the checkpoint by (model config, train config,
dataset fingerprint, seed), the embeddings by (checkpoint hash, dataset fingerprint,
preprocessing), the query set by (dataset fingerprint, query config, seed), a student by
(checkpoint, store, teacher, student config, seed).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cir_bench.config import RunConfig
from cir_bench.data import get_dataset
from cir_bench.data.base import Dataset
from cir_bench.data.queries import QuerySet, QuerySetError, build_query_set
from cir_bench.data.transforms import build_transform, describe_transform
from cir_bench.embed import EmbeddingStore, embedding_fingerprint, extract_embeddings, load_or_extract
from cir_bench.index import build_index
from cir_bench.models import BACKBONES, load_checkpoint, pick_device, save_checkpoint
from cir_bench.models.model import ConditionalRetrievalModel
from cir_bench.models.student import Student
from cir_bench.paths import cache_root, file_sha256, load_or_build, write_checked
from cir_bench.search import SearchContext
from cir_bench.search.backward import IMPLEMENTATION_VERSION as BACKWARD_VERSION
from cir_bench.search.backward import BackwardSearch
from cir_bench.train import distill_student, train_model
from cir_bench.train.trainer import resolve_input_size

CHECKPOINT_FORMAT = 1


def cache_dir_for(cfg: RunConfig) -> Path:
    return cache_root(cfg.cache_dir)


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
        "model": cfg.model.model_dump(),
        "train": cfg.train.model_dump(),
        "dataset": dataset.fingerprint(),
        "seed": cfg.seed,
        "input_size": resolve_input_size(cfg.model, dataset),
    })


def train_or_load(cfg: RunConfig, dataset: Dataset, device: torch.device, progress: bool = True) -> TrainedModel:
    """Reuse the cached checkpoint of an identical config, else train and cache it."""
    path = cache_dir_for(cfg) / "checkpoints" / f"{checkpoint_key(cfg, dataset)}.pt"

    def train() -> TrainedModel:
        t0 = time.perf_counter()
        model, history = train_model(dataset, cfg.model, cfg.train, device, cfg.seed, progress=progress)
        seconds = time.perf_counter() - t0
        save_checkpoint(path, model, cfg.model, {p.name: p.classes for p in dataset.properties},
                        {"history": history.epochs, "dataset": dataset.fingerprint(),
                         "input_size": resolve_input_size(cfg.model, dataset)})
        return TrainedModel(model, path, False, history.epochs, seconds)

    got, reused = load_or_build(path, lambda p: load_checkpoint(p, device), train, cfg.on_damaged_cache)
    if not reused:
        return got
    model, payload = got
    return TrainedModel(model, path, True, list(payload["extra"].get("history", [])))


def embed(cfg: RunConfig, dataset: Dataset, trained: TrainedModel, device: torch.device
          ) -> tuple[EmbeddingStore, bool]:
    spec = BACKBONES.get(cfg.model.backbone)
    size = resolve_input_size(cfg.model, dataset)
    prep = describe_transform(size, spec.mean, spec.std, dataset.square_resize)
    fp = embedding_fingerprint(file_sha256(trained.checkpoint), dataset.fingerprint(), prep)
    transform_args = {"input_size": size, "mean": spec.mean, "std": spec.std, "square": dataset.square_resize}
    if cfg.ray.embed or cfg.ray.address:
        from cir_bench.embed.ray_extract import extract_embeddings_ray

        def extract() -> torch.Tensor:
            return extract_embeddings_ray(trained.checkpoint, dataset, transform_args, cfg.ray.actors,
                                          cfg.ray.gpus_per_actor, cfg.ray.batch_size, cfg.ray.address)
    else:
        def extract() -> torch.Tensor:
            return extract_embeddings(trained.model, dataset, build_transform(**transform_args), device,
                                      num_workers=cfg.train.num_workers)
    return load_or_extract(cache_dir_for(cfg), fp, extract, [it.id for it in dataset.items], cfg.on_damaged_cache)


def make_queries(cfg: RunConfig, dataset: Dataset, properties: list[str]) -> tuple[QuerySet, Path]:
    """Build the query set once per (dataset, properties, query config, seed); reuse the file."""
    q = cfg.queries
    seed = cfg.seed if q.seed is None else q.seed
    settings = {k: v for k, v in q.model_dump().items() if k not in ("sets", "strict")}
    if settings["condition_draw"] == "other":  # the only draw before the option: same key, same file
        del settings["condition_draw"]
    key = _hash({"dataset": dataset.fingerprint(), "properties": properties, "queries": settings, "seed": seed})
    path = cache_dir_for(cfg) / "queries" / f"{dataset.name}-{'+'.join(properties)}-{key}.parquet"
    def build() -> QuerySet:
        qs = build_query_set(dataset, properties, q.n_queries, seed, q.min_relevant, q.query_split,
                             q.database_split, min_jaccard=q.min_jaccard, strict=q.strict,
                             condition_draw=q.condition_draw)
        write_checked(path, lambda tmp: qs.save(tmp, dataset))
        return qs

    qs, _ = load_or_build(path, lambda p: QuerySet.load(p, dataset), build, cfg.on_damaged_cache)
    return qs, path


def query_sets(cfg: RunConfig, dataset: Dataset, log=print) -> list[tuple[list[str], QuerySet, Path]]:
    """Every query set of the run, built or reused: (properties, queries, file). A set with
    fewer qualifying queries than asked is used with those (a warning); a default set with
    none is skipped (a warning); with ``queries.strict`` either is an error."""
    out = []
    for props in dataset.query_sets(cfg.queries.sets):
        name = "+".join(props)
        try:
            queries, path = make_queries(cfg, dataset, props)
        except QuerySetError as err:
            if cfg.queries.sets or cfg.queries.strict:
                raise
            log(f"warning: skipping the default query set {name}: {err}")
            continue
        if len(queries) < cfg.queries.n_queries:
            log(f"warning: query set {name}: {len(queries)} of the {cfg.queries.n_queries} queries asked qualify "
                f"(>= {cfg.queries.min_relevant} relevant items); using those (--strict-queries: an error)")
        out.append((props, queries, path))
    if not out:
        raise QuerySetError(f"no query set can be built on dataset {dataset.name}; lower queries.min_relevant or "
                            "set queries.sets")
    return out


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


def teacher(cfg: RunConfig, lam: float | None = None) -> BackwardSearch:
    """Backward Search as the ``search`` section configures it, at ``lam`` when given."""
    return BackwardSearch.from_config(cfg.search, lam)


def backward_label(lam: float) -> str:
    """The method label of Backward Search at ``lam`` in result files: ``backward[lam=0.005]``."""
    return f"backward[lam={float(lam):g}]"


def teacher_label(cfg: RunConfig) -> str:
    return backward_label(cfg.search.lam)


def distil_or_load(cfg: RunConfig, dataset: Dataset, trained: TrainedModel, store: EmbeddingStore,
                   properties: list[str], device: torch.device, progress: bool = True,
                   lam: float | None = None) -> tuple[Student, dict]:
    """The student for one property set, cached by (checkpoint, store, teacher, config, seed);
    its teacher is Backward Search at ``lam`` (default: the ``search`` section's λ)."""
    student_cfg = cfg.student
    settings = student_cfg.model_dump()
    if settings["architecture"] == "cir-bench":  # the only one before the option: same key, same file
        del settings["architecture"]
    key = _hash({"checkpoint": file_sha256(trained.checkpoint), "store": store.fingerprint, "props": properties,
                 "teacher": teacher(cfg, lam).params(), "teacher_version": BACKWARD_VERSION, "student": settings,
                 "seed": cfg.seed})
    path = cache_dir_for(cfg) / "students" / f"{key}.pt"
    info: dict[str, Any] = {"path": str(path)}

    def distil() -> Student:
        train_idx = torch.as_tensor(dataset.split_indices("train"))
        t0 = time.perf_counter()
        bs, heads = teacher(cfg, lam), trained.model.heads
        student, history = distill_student(
            lambda z0, cond: bs.invert(heads, z0, properties, cond).z, store.z[train_idx], properties,
            [dataset.property(p).num_classes for p in properties], student_cfg, cfg.seed, device,
            progress=progress)
        seconds = time.perf_counter() - t0
        student.save(path, {"history": history, "seconds": seconds})
        info.update(seconds=seconds, final_mse=history[-1]["mse"])
        return student

    student, reused = load_or_build(path, lambda p: Student.load(p, device), distil, cfg.on_damaged_cache)
    return student, {**info, "reused": reused}


