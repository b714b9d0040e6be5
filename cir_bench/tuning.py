"""Ray Tune experiments: each trial trains (or reuses the cached checkpoint of an identical
config), embeds, sweeps λ and calibrates λ to a target metric; the results become one tidy
table (one row per trial × λ) from which the report tables and plots are built.

An experiment file (``tune_configs/*.yaml``)::

    name: quick
    base: {dataset: {name: synthart, options: {preset: default}}, train: {epochs: 20}}
    grid: {model.backbone: [small_cnn], model.embed_dim: [64, 128]}   # Cartesian product
    seeds: [0]
    lambdas: [0, 0.001, 0.003, 0.01, 0.03]
    calibration: {metric: mts_at_10, target: 0.18, tolerance: 0.005, lam_min: 1.0e-4,
                  lam_max: 1.0, max_evals: 8, fraction: 0.5}
    resources: {cpu: 1, gpu: 0}
    max_failures: 1

Calibration uses ``fraction`` of each query set (seeded) and reports the test metrics on
the rest at the calibrated λ; both are in the result.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml


@dataclass
class Calibration:
    metric: str = "mts_at_10"
    target: float = 0.18
    tolerance: float = 0.005
    lam_min: float = 1e-4
    lam_max: float = 1.0
    max_evals: int = 8
    fraction: float = 0.5  # of each query set used to calibrate; the rest is the test half


@dataclass
class Experiment:
    name: str = "experiment"
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.001, 0.003, 0.01, 0.03])
    calibration: Calibration | None = field(default_factory=Calibration)
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_failures: int = 1
    report_metric: str = "precision_at_10"
    roots: dict[str, str] = field(default_factory=dict)  # dataset name -> --root, for a `task` grid
    debug: dict[str, Any] = field(default_factory=dict)  # fail_if_file_exists: PATH (fault-injection tests)

    @classmethod
    def load(cls, path: str | Path) -> "Experiment":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tune config not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
        cal = data.pop("calibration", {})
        exp = cls(**data, calibration=Calibration(**cal) if cal is not None else None)
        return exp

    def trials(self) -> list[dict[str, Any]]:
        """One dict of dotted overrides per trial: grid product x seeds."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            for seed in self.seeds:
                out.append({**dict(zip(keys, values)), "seed": seed})
        return out


def _flatten(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, dict) and prefix.split(".")[-1] not in ("options", "overrides", "property_weights"):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out.append(f"{prefix}={json.dumps(value)}")


def trial_overrides(exp: Experiment, trial: dict[str, Any], cache_dir: str | None) -> list[str]:
    """Base settings, then the trial's; a ``task`` key expands to the paper's query task."""
    from cir_bench.tasks import TASKS, task_overrides

    out: list[str] = []
    _flatten("", exp.base, out)
    for key, value in trial.items():
        if key == "task":
            out += task_overrides(value)
            dataset = TASKS[value][0].split("=", 1)[1]
            if dataset not in exp.roots:
                raise ValueError(f"task '{value}' needs roots.{dataset}: PATH in the experiment file")
            out.append(f"dataset.root={json.dumps(exp.roots[dataset])}")
        else:
            out.append(f"{key}={json.dumps(value)}")
    if cache_dir:
        out.append(f"cache_dir={cache_dir}")
    return out


def _evaluate(ctx, queries, method, k: int) -> dict[str, float]:
    from cir_bench.metrics import build_eval_inputs, evaluate, summarize

    ranking = method.search(ctx, queries, k)
    inputs = build_eval_inputs(ctx.dataset, queries, ranking.positions, ctx.database, ctx.self_match)
    out = summarize(evaluate(inputs, ks=(k,)))
    if "iterations" in ranking.extras:
        out["mean_iterations"] = float(np.mean(ranking.extras["iterations"]))
    return out


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: reports one row per (query set, λ) of the sweep and one per
    query set for the calibrated λ."""
    import torch
    from ray import tune

    from cir_bench.calibrate import calibrate
    from cir_bench.config import load_config
    from cir_bench.data.queries import QuerySet
    from cir_bench.methods.backward import BackwardSearch
    from cir_bench.pipeline import make_queries, prepare

    exp = Experiment(**{**config["experiment"],
                        "calibration": Calibration(**config["experiment"]["calibration"])
                        if config["experiment"]["calibration"] else None})
    marker = exp.debug.get("fail_if_file_exists")
    if marker and Path(marker).exists() and config["trial"].get("seed") == exp.debug.get("fail_seed", 0) \
            and config["trial"] == exp.trials()[int(exp.debug.get("fail_trial", 0))]:
        raise RuntimeError(f"injected failure: {marker} exists")
    trace = exp.debug.get("trace_file")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(json.dumps(config["trial"], sort_keys=True) + "\n")
    torch.set_num_threads(max(1, int(exp.resources.get("cpu", 1))))
    cfg = load_config(None, trial_overrides(exp, config["trial"], config.get("cache_dir")))
    prepared = prepare(cfg, progress=False)
    dataset, trained, ctx = prepared.dataset, prepared.trained, prepared.ctx
    k = cfg.eval.k
    common = {"val_acc": {k_: v for k_, v in (trained.history[-1] if trained.history else {}).items()
                          if k_.startswith("val_acc")}, "checkpoint_reused": trained.reused}

    def method(lam: float) -> BackwardSearch:
        return BackwardSearch(cfg.search.preset, lam=float(lam), **cfg.search.overrides)

    for props in cfg.queries.sets or dataset.default_query_sets():
        name = "+".join(props)
        queries, _ = make_queries(cfg, dataset, list(props))
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
                   cache_dir: str | None = None, verbose: int = 1) -> tuple[pd.DataFrame, list[str]]:
    """Run (or resume) the experiment with Ray Tune; returns the tidy results table and one
    line per trial that failed (after its ``max_failures`` retries)."""
    import ray
    from ray import tune

    from cir_bench.distributed import ensure_ray

    ensure_ray(address)
    storage = Path(storage_path).expanduser().resolve()
    path = storage / exp.name
    trainable = tune.with_resources(run_trial, {"cpu": float(exp.resources.get("cpu", 1)),
                                                "gpu": float(exp.resources.get("gpu", 0))})
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise FileNotFoundError(f"no Tune experiment to resume at {path}")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=False, restart_errored=True)
    else:
        exp_dict = asdict(exp)
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
