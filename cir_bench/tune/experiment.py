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
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from cir_bench.config import (ConfigError, ConfigLayer, NonNegativeFloat, RunConfig, Section, layered_config, parse,
                              read_yaml, task_preset)


class Calibration(Section):
    metric: str = "mts_at_10"
    target: float = 0.18
    tolerance: float = Field(0.005, gt=0)
    lam_min: float = Field(1e-4, gt=0)
    lam_max: float = Field(1.0, gt=0)
    max_evals: int = Field(8, ge=2)
    fraction: float = Field(0.5, gt=0, lt=1)  # of each query set used to calibrate; the rest is the test half


class Resources(Section):
    cpu: float = Field(1.0, ge=0)  # per trial
    gpu: float = Field(0.0, ge=0)


class Experiment(Section):
    name: str = "experiment"
    base: dict[str, Any] = Field(default_factory=dict)  # run config (any key of cir_bench/config.py)
    grid: dict[str, list[Any]] = Field(default_factory=dict)  # dotted key (or `task`) -> values
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    lambdas: list[NonNegativeFloat] = Field(default_factory=lambda: [0.0, 0.001, 0.003, 0.01, 0.03])
    calibration: Calibration | None = Field(default_factory=Calibration)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(1, ge=0)
    report_metric: str = "precision_at_10"
    roots: dict[str, str] = Field(default_factory=dict)  # dataset name -> --root, for a `task` grid

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Experiment":
        exp = parse(cls, data)
        if exp.calibration is not None and exp.calibration.lam_min >= exp.calibration.lam_max:
            raise ConfigError("calibration.lam_min must be < calibration.lam_max")
        if not exp.seeds:
            raise ConfigError("seeds must list at least one seed")
        return exp

    @classmethod
    def load(cls, path: str | Path) -> "Experiment":
        """Read and check an experiment file, every trial's run config included, before any
        work; errors name the file and the key."""
        data = read_yaml(path, "tune config")
        try:
            exp = cls.from_dict(data)
            exp.check()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}", err.key, str(path)) from None
        return exp

    def check(self) -> None:
        """Every trial's run config is valid (types, ranges, names in the registries)."""
        from cir_bench.pipeline.checks import check_run_config

        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
        for trial in self.trials():
            try:
                check_run_config(trial_config(self, trial, None), need_out=False)
            except ConfigError as err:
                varying = {k: v for k, v in trial.items() if k != "seed"}
                raise ConfigError(f"{err} (in the trial {varying or 'base'})") from None

    def trials(self) -> list[dict[str, Any]]:
        """One dict of dotted overrides per trial: grid product x seeds. A key joining several
        keys with ``+`` is one axis whose values set them together (``model.finetune+train.epochs:
        [[false, 20], [true, 1]]``): fine-tuning gets its own epochs, not a product."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            trial: dict[str, Any] = {}
            for key, value in zip(keys, values):
                parts = key.split("+")
                if len(parts) == 1:
                    trial[key] = value
                    continue
                if not isinstance(value, list) or len(value) != len(parts):
                    raise ConfigError(f"grid.{key}: each value must list {len(parts)} values ({', '.join(parts)}), "
                                      f"got {value!r}")
                trial.update(zip(parts, value))
            for seed in self.seeds:
                out.append({**trial, "seed": seed})
        return out


def trial_config(exp: Experiment, trial: dict[str, Any], cache_dir: str | None) -> RunConfig:
    """The run config of one trial (``config.layered_config``): defaults (with the dataset's own),
    the experiment's ``base``, then the trial's values in order; a ``task`` value applies the
    paper's query task and its dataset root."""
    layers = [ConfigLayer("base", exp.base)]
    for key, value in trial.items():
        if key != "task":
            layers.append(ConfigLayer(f"grid.{key}", values={key: value}))
            continue
        preset = task_preset(value)
        dataset = preset["dataset"]["name"]
        if dataset not in exp.roots:
            raise ConfigError(f"task '{value}' needs roots.{dataset}: PATH in the experiment file")
        layers.append(ConfigLayer(f"grid.task={value}", preset, {"dataset.root": exp.roots[dataset]}))
    if cache_dir:
        layers.append(ConfigLayer("the trial's cache", values={"cache_dir": str(cache_dir)}))
    return layered_config(layers)
