"""Run configuration: dataclasses loadable from YAML, with ``key.sub=value`` CLI overrides.

Every random choice in a run takes its seed from here (``RunConfig.seed`` unless a section
sets its own), so a config file plus the package versions reproduce a run.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or holds a bad value."""


@dataclass
class DatasetConfig:
    name: str = "synthart"
    root: str | None = None  # folder of a dataset on disk (real datasets)
    options: dict[str, Any] = field(default_factory=lambda: {"preset": "default"})


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"
    pretrained: bool = False
    weights: str | None = None  # explicit path to backbone weights (pretrained=True)
    embed_dim: int = 128
    finetune: bool = True  # False: backbone frozen (eval mode, no gradients)
    input_size: int | None = None  # None: the dataset's native size, else the backbone's
    head_hidden: list[int] = field(default_factory=lambda: [256, 128])
    encoder_dropout: float = 0.1
    head_dropout: float = 0.2  # the authors' heads use 0.4; 0.2 fits the small demo set better


@dataclass
class TrainConfig:
    # defaults sized for the SynthArt demo on 2 CPU cores; the paper trains 100 epochs
    # with StepLR(30, 0.1) and weight decay 1e-4 (tune_configs carry that recipe)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-5
    lr_step: int = 30  # StepLR step size in epochs
    lr_gamma: float = 0.1
    val_fraction: float = 0.1  # held out of the train split for the val accuracy
    property_weights: dict[str, float] = field(default_factory=dict)  # w_i of Eq 1; default 1
    augment: bool = False
    num_workers: int = 0


@dataclass
class QueryConfig:
    # one query set per entry; None: the dataset's default (its first property alone, and
    # its first two together: on SynthArt style, and style+shape like WikiArt-multi)
    sets: list[list[str]] | None = None
    n_queries: int = 200
    min_relevant: int = 10
    min_jaccard: float | None = None  # the paper's tag filter (J >= 0.1), off as in the authors' code
    query_split: str = "test"
    database_split: str = "test"  # the paper retrieves from the test split
    seed: int | None = None  # None: the run seed


def _default_methods() -> list[Any]:
    return ["random", "knn", "filtered_knn", "oracle_filtered_knn", {"method": "backward", "lam": 0.0},
            "backward", "student"]


@dataclass
class EvalConfig:
    k: int = 10
    self_match: str = "exclude"  # or "keep" (authors' code)
    # a name, or {method: NAME, label: ..., **params}; "backward" takes its settings from
    # the `search` section, entries may override any of them
    methods: list[Any] = field(default_factory=_default_methods)
    lambdas: list[float] | None = None  # --lambda: add one Backward Search entry per value
    search_batch: int = 1024
    # search backend (cir_bench/indexes.py): "exact" (torch, tie-stable) or "faiss" with
    # index_options {factory: "Flat" | "HNSW32" | "IVF256,Flat", nprobe, ef_search}
    index: str = "exact"
    index_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchConfig:
    """Backward Search settings (methods/backward.py); also the student's teacher."""

    preset: str = "paper"
    lam: float = 0.005  # sum-L1 over 128 dims: 0.005 here is 0.64 in the authors' mean-L1 units
    overrides: dict[str, Any] = field(default_factory=dict)  # any BackwardSearchConfig field


@dataclass
class StudentSection:
    overrides: dict[str, Any] = field(default_factory=dict)  # any StudentConfig field


@dataclass
class RayConfig:
    """Ray Data embedding extraction: used when ``embed`` is true or ``address`` is set."""

    address: str | None = None  # a Ray cluster (``ray://...`` or ``auto``); None: local Ray
    embed: bool = False
    actors: int = 2  # actor pool size: one model copy each
    gpus_per_actor: float = 0.0  # e.g. 0.25 puts four actors on one GPU
    batch_size: int = 64


@dataclass
class BaselinesConfig:
    """CoIR baselines of ``cir-bench compare`` (baselines/)."""

    weights_dir: str | None = None  # root of the authors' files; --weights-dir overrides it
    # per-adapter options, e.g. {clip4cir: {variant: fiq}, clip-sum: {backbone: ViT-B-32}}
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    student: StudentSection = field(default_factory=StudentSection)
    ray: RayConfig = field(default_factory=RayConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a scalar against its declared type; numeric strings such as ``3e-3`` (which
    YAML 1.1 reads as text) become numbers."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, getattr(__import__("types"), "UnionType", Union)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{where}' expects a number, got {value!r}") from None
    if hint is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"config key '{where}' expects an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{where}' expects true or false, got {value!r}")
    if hint is str and value is not None and not isinstance(value, str):
        return str(value)
    origin = typing.get_origin(hint)
    if origin is list and not isinstance(value, list):
        raise ConfigError(f"config key '{where}' expects a list, got {value!r}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"config key '{where}' expects a mapping, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{where + '.' if where else ''}{key}'; known: {', '.join(fields)}"
            )
        default = getattr(cls(), key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _from_dict(type(default), value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, data, "")


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``a.b=value`` overrides; values are parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return config_from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        cfg = config_from_dict(data)
    return apply_overrides(cfg, overrides or [])
