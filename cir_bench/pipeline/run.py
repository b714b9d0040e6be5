"""``cir-bench run``: the whole chain on one dataset, dataset -> train -> embed/index ->
query sets -> search -> score -> result files."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from cir_bench.config import ConfigError, RunConfig
from cir_bench.metrics import find_twins, ranking_depth, retrieved_similarity_at_k, score_ranking, summarize
from cir_bench.models import pick_device
from cir_bench.paths import exclusive_folder, file_sha256
from cir_bench.pipeline.lambda_curve import curve_solvers, lambda_curve
from cir_bench.pipeline.steps import backward_label, cache_dir_for, distil_or_load, load_dataset, prepare, teacher_label
from cir_bench.pipeline.steps import query_sets as built_query_sets
from cir_bench.results import write_run
from cir_bench.search import METHODS, get_method
from cir_bench.search.base import Ranking
from cir_bench.train import seed_everything


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.dataset.name}"


@dataclass(frozen=True)
class MethodSpec:
    """One entry of the method list: a unique label, the registry name, its parameters."""

    label: str
    name: str
    params: dict[str, Any]


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
            params = {"preset": cfg.search.preset, "lam": float(cfg.search.lam), **cfg.search.overrides(), **params}
            label = label or backward_label(params['lam'])
        elif name == "student" and params.get("lam") is not None:
            params["lam"] = float(params["lam"])
            label = label or "student" + backward_label(params["lam"])[len("backward"):]
        elif name == "soft_filtered_knn" and "beta" in params:
            params["beta"] = float(params["beta"])
            label = label or f"soft_filtered_knn[beta={params['beta']:g}]"
        specs.append(MethodSpec(label or name, name, params))
    seen: set[str] = set()
    unique = []
    for spec in specs:  # --lambda may repeat a lambda already listed
        if spec.label not in seen:
            seen.add(spec.label)
            unique.append(spec)
    return unique


def run(cfg: RunConfig, progress: bool = True, log=print) -> Path:
    """The whole pipeline; returns the run directory holding the result files. The directory
    is locked while the run lasts: a second run on it is refused at once, naming this one."""
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    with exclusive_folder(out):
        return _run(cfg, out, progress, log)


def seed_configs(cfg: RunConfig, seeds: Sequence[int], overwrite: bool = False) -> list[RunConfig]:
    """One checked config per training seed, under <out>/seed-<n>/; the query sets are drawn
    once, with the first seed (``queries.seed``), so the runs differ in training only."""
    from cir_bench.pipeline.checks import check_run_config

    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds {list(seeds)}: give at least two different non-negative seeds", key="seed")
    base = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    configs = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.seed, one.out = int(seed), str(base / f"seed-{seed}")
        if one.queries.seed is None:
            one.queries.seed = int(seeds[0])
        configs.append(check_run_config(one, need_out=True, overwrite=overwrite))  # all checked first
    return configs


def _run(cfg: RunConfig, out: Path, progress: bool, log) -> Path:
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    specs = method_specs(cfg)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    dataset = load_dataset(cfg)
    timings["dataset_s"] = time.perf_counter() - t0
    skipped = {k: v for k, v in dataset.report.items() if k.startswith("skipped_") and v and k != "skipped_examples"}
    if skipped:
        log(f"warning: dataset {dataset.name}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items())
            + f" (e.g. {', '.join(map(str, dataset.report.get('skipped_examples', [])[:3]))}; all in the manifest)")
    log(f"dataset {dataset.name}: {len(dataset)} items, properties "
        + ", ".join(f"{p.name}({p.num_classes})" for p in dataset.properties) + f"; device {device}")

    cluster = None
    if cfg.ray.address:  # before any work: every node must see the cache (and the dataset root)
        from cir_bench.cluster import join

        cluster = join(cfg.ray.address, cache_dir_for(cfg), [cfg.dataset.root] if cfg.dataset.root else [])
        log(f"Ray cluster {cfg.ray.address}: {len(cluster['nodes'])} node(s), each reads and writes the cache "
            f"folder {cache_dir_for(cfg)}")

    # the query sets depend on the dataset only: built (or found unbuildable) before training
    built = built_query_sets(cfg, dataset, log)
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
    moved: list[pd.DataFrame] = []  # z* of the methods that move the query (map_points.parquet)
    curves: list[pd.DataFrame] = []  # the λ curve (lambda_curve.parquet)
    methods: dict[str, Any] = {}  # one instance per label across query sets (setup runs once)
    for props, queries, query_file in built:
        set_name = "+".join(props)
        query_info[set_name] = {"file": str(query_file), "n": len(queries), "requested": cfg.queries.n_queries}
        twins = find_twins(dataset, queries, database)
        log(f"query set {set_name}: {len(queries)} queries, database {len(database)} items "
            f"(split '{cfg.queries.database_split}'), self-match {cfg.eval.self_match}")
        for spec in (s for s in specs if s.name == "student"):
            lam = spec.params.get("lam")
            t0 = time.perf_counter()
            student, info = distil_or_load(cfg, dataset, trained, store, list(props), device, progress, lam=lam)
            ctx.cache.setdefault("students", {})[(tuple(props), lam)] = student
            teacher_of = teacher_label(cfg) if lam is None else backward_label(lam)
            if lam is None:
                student_info[set_name] = {**info, "teacher": teacher_of}
                timings[f"distil_{set_name}_s"] = time.perf_counter() - t0
            else:
                student_info.setdefault(f"{set_name} sweep", {})[spec.label] = {**info, "teacher": teacher_of}
                timings[f"distil_{set_name}_{spec.label}_s"] = time.perf_counter() - t0
        # the domain-conversion metrics judge the whole ranking; the run keeps its top k
        depth = ranking_depth(dataset, database, cfg.eval.k)
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
            full = method.search(ctx, queries, depth)
            elapsed = time.perf_counter() - t0
            ranking = full if depth == cfg.eval.k else head_of(full, cfg.eval.k)
            rankings[spec.label] = ranking
            per_query = score_ranking(dataset, queries, full.positions, cfg.eval.k, database, cfg.eval.self_match,
                                      twins)
            summary: dict[str, Any] = {"query_set": set_name, "method": spec.label, "name": spec.name,
                                       "n_queries": len(queries), **summarize(per_query)}
            if "iterations" in ranking.extras:
                it = ranking.extras["iterations"].astype(float)
                summary.update(mean_iterations=float(it.mean()), std_iterations=float(it.std()),
                               satisfied_rate=float(ranking.extras["satisfied"].mean()))
            teacher_of = backward_label(spec.params["lam"]) if "lam" in spec.params else teacher_label(cfg)
            if spec.name == "student" and teacher_of in rankings:
                sim = retrieved_similarity_at_k(rankings[teacher_of].positions, ranking.positions, cfg.eval.k)
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
            if ranking.query_vectors is not None:
                moved.append(pd.DataFrame({"role": "moved", "query_set": set_name, "method": spec.label,
                                           "query_id": qframe["query_id"].to_numpy(),
                                           "item_id": ids[queries.positions],
                                           "z": list(ranking.query_vectors.astype(np.float32))}))
            log(f"  {spec.label:<24} precision@{cfg.eval.k}={summary[f'precision_at_{cfg.eval.k}']:.3f} "
                f"({summary['ms_per_query']:.2f} ms/query)")
        if cfg.eval.lambda_curve and cfg.eval.lambda_curve_solvers:
            curve, seconds = lambda_curve(cfg, dataset, ctx, queries, set_name, twins, log)
            curves.append(curve)
            for solver, s in seconds.items():
                timings[f"lambda_curve_{set_name}_{solver}_s"] = s

    items = dataset.to_frame()
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        # float results (training, distillation, Backward Search) depend in their last bits on
        # the CPU's kernels and the thread count: docs/reproducibility.md
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint(), "n_items": len(dataset),
                    "root": cfg.dataset.root, "report": dataset.report,
                    "properties": {p.name: list(p.classes) for p in dataset.properties},
                    # the domain-conversion protocol the dc_* metrics follow (None: not defined)
                    "protocol": ({"class": dataset.class_key, "domain": dataset.domain_property}
                                 if dataset.class_key is not None else None)},
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
        "cluster": cluster,  # None: local; else the address and the nodes that shared the cache
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
    }
    points = map_points(store.z, ids, database, np.unique(np.concatenate([q.positions for _, q, _ in built])),
                        moved, cfg.seed)
    extra = {"map_points.parquet": points}
    if curves:
        extra["lambda_curve.parquet"] = pd.concat(curves, ignore_index=True)
        manifest["lambda_curve"] = {"lambdas": [float(v) for v in cfg.eval.lambda_curve],
                                    "solvers": {s.name: {"preset": s.search.preset, **s.search.params()}
                                                for s in curve_solvers(cfg)}}
    write_run(out, pd.concat(result_frames, ignore_index=True), pd.DataFrame(metric_rows), items, manifest,
              extra=extra)
    return out


MAP_DATABASE_SAMPLE = 1500


def head_of(ranking: Ranking, k: int) -> Ranking:
    """The top k of a deeper ranking (its diagnostics and moved query vectors unchanged)."""
    return Ranking(ranking.positions[:, :k], ranking.scores[:, :k], ranking.extras, ranking.query_vectors)


def map_points(z: torch.Tensor, ids: np.ndarray, database: np.ndarray, query_positions: np.ndarray,
               moved: list[pd.DataFrame], seed: int) -> pd.DataFrame:
    """The embeddings the report's map (Fig 5) is drawn from: a seeded sample of at most
    MAP_DATABASE_SAMPLE database items, every query's z0, and the z* of each method that moves
    the query. The report projects them together; the run keeps the raw vectors."""
    rng = np.random.default_rng([seed, 5])
    sample = np.sort(rng.choice(database, size=min(MAP_DATABASE_SAMPLE, len(database)), replace=False))
    zz = z.float().numpy()
    frames = [pd.DataFrame({"role": "database", "item_id": ids[sample], "z": list(zz[sample])}),
              pd.DataFrame({"role": "query", "item_id": ids[query_positions], "z": list(zz[query_positions])}),
              *moved]
    return pd.concat(frames, ignore_index=True)
