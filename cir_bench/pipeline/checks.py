"""Checks of a run config against the registries, before any work: what the typed config
(cir_bench/config.py) cannot know on its own (dataset, backbone, index and method names,
Backward Search and method parameters, the output folder, the device)."""
from __future__ import annotations

import os
from pathlib import Path

from cir_bench.config import ConfigError, RunConfig
from cir_bench.registry import UnknownNameError


def check_run_config(cfg: RunConfig, need_out: bool = True, overwrite: bool = False) -> RunConfig:
    """Raise ``ConfigError`` naming the key of the first problem; return ``cfg``."""
    from cir_bench.data import DATASETS
    from cir_bench.index import INDEXES
    from cir_bench.models import BACKBONES
    from cir_bench.pipeline.run import method_specs
    from cir_bench.search import get_method

    for key, registry, name in (("dataset.name", DATASETS, cfg.dataset.name),
                                ("model.backbone", BACKBONES, cfg.model.backbone),
                                ("eval.index", INDEXES, cfg.eval.index)):
        try:
            registry.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"config key '{key}': {err}", key=key) from None
    from cir_bench.data import check_dataset_options

    try:
        check_dataset_options(cfg.dataset.name, cfg.dataset.options)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.dataset.name == "synthart" and cfg.dataset.root is not None:
        raise ConfigError("config key 'dataset.root': dataset 'synthart' is generated, it takes no root",
                          key="dataset.root")
    try:
        specs = method_specs(cfg)
    except (UnknownNameError, ValueError) as err:
        raise ConfigError(f"config key 'eval.methods': {err}", key="eval.methods") from None
    for spec in specs:
        where = "search" if spec.name == "backward" else f"eval.methods ({spec.label})"
        try:
            get_method(spec.name, **spec.params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config key '{where}': {err}", key="search" if spec.name == "backward" else
                              "eval.methods") from None
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device': '{cfg.device}' asked for, but CUDA is not available here",
                              key="device")
    if need_out and cfg.out:
        _check_out(Path(cfg.out), overwrite)
    return cfg


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config key 'out': {out} exists and is not a folder", key="out")
    if (out / "manifest.json").exists() and not overwrite:
        raise ConfigError(f"config key 'out': {out} already holds a run (manifest.json); pass --overwrite to "
                          "replace its files, or choose another --out", key="out")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config key 'out': cannot write under {parent}", key="out")
