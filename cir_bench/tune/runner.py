"""Running an experiment with Ray Tune: the trainable (one trial = train or reuse, embed,
λ sweep, λ calibration), resume, and the tidy results table."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from cir_bench.tune.experiment import Experiment, trial_config


def _evaluate(ctx, queries, method, k: int) -> dict[str, float]:
    from cir_bench.metrics import build_eval_inputs, evaluate, summarize

    from cir_bench.report.stats import bootstrap_ci

    ranking = method.search(ctx, queries, k)
    inputs = build_eval_inputs(ctx.dataset, queries, ranking.positions, ctx.database, ctx.self_match)
    per_query = evaluate(inputs, ks=(k,))
    out = summarize(per_query)
    for col in (f"precision_at_{k}", f"mts_at_{k}", f"context_at_{k}", f"hit_context_at_{k}", f"twin_hit_at_{k}"):
        if col in per_query:  # the report's Table 3 shows every mean with its 95 % bootstrap interval
            est = bootstrap_ci(per_query[col].to_numpy(dtype=float), seed=ctx.seed)
            out[f"{col}_ci_low"], out[f"{col}_ci_high"] = est.low, est.high
    if "iterations" in ranking.extras:
        out["mean_iterations"] = float(np.mean(ranking.extras["iterations"]))
    return out


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: reports one row per (query set, λ) of the sweep and one per
    query set for the calibrated λ."""
    import ray
    import torch
    from ray import tune

    from cir_bench.data.queries import QuerySet
    from cir_bench.search.backward import BackwardSearch
    from cir_bench.pipeline import prepare, query_sets
    from cir_bench.tune.calibrate import calibrate

    exp = Experiment.from_dict(config["experiment"])
    torch.set_num_threads(max(1, int(exp.resources.cpu)))
    cfg = trial_config(exp, config["trial"], config.get("cache_dir"))
    prepared = prepare(cfg, progress=False)
    dataset, trained, ctx = prepared.dataset, prepared.trained, prepared.ctx
    k = cfg.eval.k
    common = {"val_acc": {k_: v for k_, v in (trained.history[-1] if trained.history else {}).items()
                          if k_.startswith("val_acc")}, "checkpoint_reused": trained.reused,
              "node_id": ray.get_runtime_context().get_node_id()}  # where Ray placed the trial

    def method(lam: float) -> BackwardSearch:
        return BackwardSearch.from_config(cfg.search, lam)

    for props, queries, _ in query_sets(cfg, dataset, log=lambda *_: None):
        name = "+".join(props)
        rng = np.random.default_rng([cfg.seed, 53])
        order = rng.permutation(len(queries))
        n_cal = int(round((exp.calibration.fraction if exp.calibration else 0.0) * len(queries)))
        cal = QuerySet(queries.properties, queries.positions[order[:n_cal]], queries.conditions[order[:n_cal]])
        test = QuerySet(queries.properties, queries.positions[order[n_cal:]], queries.conditions[order[n_cal:]])
        for lam in exp.lambdas:
            metrics = _evaluate(ctx, test, method(lam), k)
            tune.report({"kind": "sweep", "query_set": name, "lam": float(lam), "n_queries": len(test),
                         **metrics, **common})
        if exp.calibration is not None and n_cal > 0:
            c = exp.calibration
            result = calibrate(lambda lam: _evaluate(ctx, cal, method(lam), k)[c.metric],
                               c.target, c.tolerance, c.lam_min, c.lam_max, c.max_evals)
            row = {"kind": "calibrated", "query_set": name, "cal_status": result.status, "cal_metric": c.metric,
                   "cal_target": c.target, "cal_value": result.value, "cal_evals": result.n_evaluations,
                   "cal_message": result.message, "n_queries": len(test), **common}
            if result.lam is not None:
                row.update(lam=float(result.lam), **_evaluate(ctx, test, method(result.lam), k))
            tune.report(row)


def run_experiment(exp: Experiment, storage_path: str | Path, resume: bool = False, address: str | None = None,
                   cache_dir: str | None = None, verbose: int = 1, trainable: Callable[[dict], None] = run_trial,
                   trust_storage: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Run (or resume) the experiment with Ray Tune; returns the tidy results table and one
    line per trial that failed (after its ``max_failures`` retries). ``trainable``: the
    function one trial runs (``run_trial``; tests wrap it to inject failures). Resuming
    unpickles Tune's files from the storage folder: it is refused when others can write
    there, unless ``trust_storage``."""
    from ray import tune

    from cir_bench.cluster import connect
    from cir_bench.paths import check_private_tree

    storage = Path(storage_path).expanduser().resolve()
    if address:  # trials read and write the cache and Tune's storage on whichever node they run
        from cir_bench.cluster import check_shared_folder, join
        from cir_bench.paths import cache_root

        join(address, cache_root(cache_dir))
        storage.mkdir(parents=True, exist_ok=True)
        check_shared_folder(storage, what="Tune storage folder", flag="--storage-path")
    path = storage / exp.name
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"no Tune experiment to resume at {path}")
        if trust_storage:
            print(f"cir-bench: --trust-storage: unpickling Tune's files under {path} without checking who can "
                  "write there", file=sys.stderr, flush=True)
        else:
            check_private_tree(path, flag="--trust-storage")
    connect(address)
    trainable = tune.with_resources(trainable, {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu})
    if resume:
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=False, restart_errored=True)
    else:
        exp_dict = exp.model_dump()
        param_space = {"trial": tune.grid_search(exp.trials()), "experiment": exp_dict, "cache_dir": cache_dir}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            run_config=tune.RunConfig(name=exp.name, storage_path=str(storage), verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=exp.max_failures)),
        )
    grid = tuner.fit()
    errors = [f"{json.dumps(r.config['trial'], sort_keys=True)}: {type(r.error).__name__}: {r.error}"
              for r in grid if r.error]
    return tidy_results(grid), errors


def tidy_results(grid) -> pd.DataFrame:
    """One row per (trial, query set, λ) and per calibrated point; trial settings as columns."""
    frames = []
    for result in grid:
        if result.metrics_dataframe is None or result.metrics_dataframe.empty:
            continue
        df = result.metrics_dataframe.copy()
        trial = result.config["trial"]
        for key, value in trial.items():
            df[key] = value if not isinstance(value, (list, dict)) else json.dumps(value)
        df["trial_id"] = result.metrics.get("trial_id") if result.metrics else None
        df["error"] = repr(result.error) if result.error else None
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    keep = [c for c in out.columns if not c.startswith(("time_", "timestamp", "date", "pid", "hostname", "node_ip",
                                                         "checkpoint_dir_name", "done", "iterations_since",
                                                         "config/"))]
    return out[keep]
