"""Run configuration: typed dataclasses loadable from YAML, with ``key.sub=value`` overrides.

Every value is checked when it is set (type, allowed choices) and the whole config is
validated (ranges, finiteness) when it is loaded, before any work: a mistyped or
out-of-range value fails at once with its key named.

Precedence, whatever the order of the flags on the command line (``cli.build_config``):
defaults < ``--task`` < ``--paper-recipe`` < ``--config FILE`` < named flags (``--dataset``,
``--root``, ``--preset``, ``--seed``, ...) < ``--set KEY=VALUE`` (in the order given).
Dataset options belong to a dataset: a ``--dataset`` that changes the dataset drops the
options set for the previous one (before any ``--set dataset.options.*``).

Every random choice in a run takes its seed from here (``RunConfig.seed`` unless a section
sets its own), so a config file plus the package versions reproduce a run.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import yaml


# Backward Search's choices (search/backward_step.py and search/backward.py read them from here)
BackwardPreset = Literal["paper", "authors-code", "converged"]
Regularizer = Literal["l1", "l2"]
Reduction = Literal["sum", "mean"]  # over embedding dimensions
Optimizer = Literal["adam", "sgd", "proximal"]
# plateau: patience on the total loss (the paper preset); plateau-ce: on the CE alone (the
# L1 term grows while the CE vanishes, so the total stops early for any λ > 0); converged:
# the proximal solver's tolerance (search/proximal.py), with the proximal optimiser only
StoppingRule = Literal["satisfied", "plateau", "plateau-ce", "none", "authors-code", "converged"]
# eager: the loop that shrinks its batch as queries freeze (CPU default); fixed: one shape,
# masks, padded to a bucket; graph: fixed, each step a captured CUDA graph (CUDA default)
Engine = Literal["auto", "eager", "fixed", "graph"]
# auto: dL/dz by hand through heads that are plain chains (search/objective.py), else autograd
Gradient = Literal["auto", "autograd"]


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or holds a bad value; ``key``:
    the dotted key at fault (list items as ``key[i]``) when one is, ``source``: the file or
    flag that set it, once known."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key, self.source = key, source


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
             gt: float | None = None, le: float | None = None, lt: float | None = None,
             items: bool = False) -> Any:
    """A field with bounds checked by ``validate`` (``items``: the bounds apply to each
    element of a list or each value of a mapping)."""
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    meta["items"] = items
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DatasetConfig:
    name: str = "synthart"
    root: str | None = None  # folder of a dataset on disk (real datasets)
    # loader options (`cir-bench list datasets`; README "Datasets on disk"); SynthArt: preset
    # (tiny | small | default, default "default") and generator parameters
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"
    pretrained: bool = False
    weights: str | None = None  # explicit path to backbone weights (pretrained=True)
    embed_dim: int = bounded(128, ge=1)
    finetune: bool = True  # False: backbone frozen (eval mode, no gradients)
    input_size: int | None = bounded(None, ge=8)  # None: the dataset's native size, else the backbone's
    head_hidden: list[int] = bounded(factory=lambda: [256, 128], ge=1, items=True)
    encoder_dropout: float = bounded(0.1, ge=0, lt=1)
    head_dropout: float = bounded(0.2, ge=0, lt=1)  # the authors' heads use 0.4; 0.2 fits the small demo set


@dataclass
class TrainConfig:
    # defaults sized for the SynthArt demo on 2 CPU cores; the paper trains 100 epochs
    # with StepLR(30, 0.1) and weight decay 1e-4 (--paper-recipe)
    epochs: int = bounded(40, ge=1)
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(3e-3, gt=0)
    weight_decay: float = bounded(1e-5, ge=0)
    lr_step: int = bounded(30, ge=1)  # StepLR step size in epochs
    lr_gamma: float = bounded(0.1, gt=0)
    val_fraction: float = bounded(0.1, ge=0, lt=1)  # held out of the train split for the val accuracy
    property_weights: dict[str, float] = bounded(factory=dict, ge=0, items=True)  # w_i of Eq 1; default 1
    augment: bool = False
    num_workers: int = bounded(0, ge=0)


@dataclass
class QueryConfig:
    # one query set per entry; None: the dataset's default (its first property alone, and
    # its first two together: on SynthArt style, and style+shape like WikiArt-multi)
    sets: list[list[str]] | None = None
    n_queries: int = bounded(200, ge=1)
    min_relevant: int = bounded(10, ge=1)
    min_jaccard: float | None = bounded(None, ge=0, le=1)  # the paper's tag filter (0.1), off as in the authors' code
    query_split: str = "test"
    database_split: str = "test"  # the paper retrieves from the test split
    seed: int | None = bounded(None, ge=0)  # None: the run seed
    # False: a set with fewer qualifying queries than n_queries is built with those (warned,
    # the count recorded), a default set with none is skipped; True (--strict-queries): error
    strict: bool = False
    # a query's condition: a class other than its own ("other", cir-bench's choice; the paper
    # is silent) or any class ("any", as the authors' code draws, about 1/C of them its own)
    condition_draw: Literal["other", "any"] = "other"


# the precision–context frontier of the report: Backward Search and its student as curves over
# λ, soft filtered kNN over β (cheap: the students cost one distillation each)
FRONTIER_LAMBDAS = [0.0005, 0.001, 0.002, 0.01, 0.02, 0.05]
FRONTIER_STUDENT_LAMBDAS = [0.0, 0.02]
FRONTIER_BETAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
# the λ curve (pipeline/lambda_curve.py): λ = 0 and 13 values log-spaced from 1e-5 to 1e-1
# (two significant digits), dense where precision changes on SynthArt
LAMBDA_CURVE = [0.0] + [float(f"{v:.2g}") for v in (10.0 ** (-5 + i / 3) for i in range(13))]


def _default_methods() -> list[Any]:
    return (["random", "knn", "filtered_knn", "oracle_filtered_knn", {"method": "backward", "lam": 0.0},
             "backward", "student"]
            + [{"method": "backward", "lam": lam} for lam in FRONTIER_LAMBDAS]
            + [{"method": "student", "lam": lam} for lam in FRONTIER_STUDENT_LAMBDAS]
            + [{"method": "soft_filtered_knn", "beta": beta} for beta in FRONTIER_BETAS])


@dataclass
class EvalConfig:
    k: int = bounded(10, ge=1)
    self_match: Literal["exclude", "keep"] = "exclude"  # keep: the authors' code
    # a name, or {method: NAME, label: ..., **params}; "backward" takes its settings from
    # the `search` section, entries may override any of them
    methods: list[Any] = field(default_factory=_default_methods)
    lambdas: list[float] | None = bounded(None, ge=0, items=True)  # --lambda: one Backward Search entry each
    # the λ curve: the run's Backward Search and Eq 4 solved to its tolerance at each λ
    # (lambda_curve.parquet; [] for none)
    lambda_curve: list[float] = bounded(factory=lambda: list(LAMBDA_CURVE), ge=0, items=True)
    lambda_curve_solvers: list[Literal["preset", "converged"]] = field(
        default_factory=lambda: ["preset", "converged"])
    search_batch: int = bounded(1024, ge=1)
    # search backend (cir_bench/index/): "exact" (torch, tie-stable) or "faiss" with
    # index_options {factory: "Flat" | "HNSW32" | "IVF256,Flat", nprobe, ef_search}
    index: str = "exact"
    index_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchConfig:
    """Backward Search (search/backward.py), also the student's teacher. ``preset`` sets every
    field left at None; a value given here overrides the preset's."""

    preset: BackwardPreset = "paper"
    lam: float = bounded(0.005, ge=0)  # sum-L1 over 128 dims: 0.005 here is 0.64 in the authors' mean-L1 units
    regularizer: Regularizer | None = None
    reduction: Reduction | None = None
    optimizer: Optimizer | None = None
    lr: float | None = bounded(None, gt=0)
    max_iter: int | None = bounded(None, ge=0)
    condition_weights: dict[str, float] = bounded(factory=dict, ge=0, items=True)  # w_m, default 1
    average_conditions: bool | None = None
    stopping: StoppingRule | None = None
    confidence: float | None = bounded(None, ge=0, lt=1)
    patience: int | None = bounded(None, ge=1)
    min_delta: float | None = bounded(None, ge=0)
    batch_size: int | None = bounded(None, ge=1)  # queries per chunk: bounds memory
    tol: float | None = bounded(None, gt=0)  # converged: the gradient mapping of the accepted step to reach
    budget_confidence: float | None = bounded(None, gt=0, lt=1)  # converged at λ = 0: stop at p(c|z) >= this
    # how the loop runs (not what it computes; not part of the cache keys): auto = a captured
    # CUDA graph on CUDA, the eager shrinking loop on CPU; fixed = the masked fixed-shape loop
    # uncaptured; eager/fixed turn capture off
    engine: Engine | None = None
    check_every: int | None = bounded(None, ge=0)  # fixed/graph: read the stop mask every N steps (0: never)
    # how dL/dz is taken (likewise not in the cache keys): auto = by hand through heads that are
    # Linear/ReLU/BatchNorm chains (autograd's arithmetic, fewer kernels), autograd otherwise
    gradient: Gradient | None = None
    # the fixed-shape step through torch.compile (fused kernels; compiled once per bucket and
    # settings, seconds each, λ excluded; on CUDA captured after); engine auto then picks fixed on CPU
    compile: bool | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields that override the preset (what ``BackwardSearch(preset, **...)`` takes)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("preset", "lam", "condition_weights") and getattr(self, f.name) is not None}
        if self.condition_weights:
            out["condition_weights"] = dict(self.condition_weights)
        return out


@dataclass
class StudentConfig:
    """The distilled student (models/student.py) and its distillation."""

    # "cir-bench": the MLP below; "authors": the authors' network (sigmoid, BN, tanh output,
    # 128 wide, no dropout; hidden/bottleneck/dropout unused), with residual=false as they do
    architecture: Literal["cir-bench", "authors"] = "cir-bench"
    hidden: list[int] = bounded(factory=lambda: [256, 128], ge=1, items=True)  # encoder widths; decoder mirrors
    bottleneck: int = bounded(64, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)
    # predict z* - z0 and add z0 back (a named deviation: the paper predicts z* directly)
    residual: bool = True
    epochs: int = bounded(40, ge=1)
    batch_size: int = bounded(256, ge=2)  # BatchNorm needs two rows
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.0, ge=0)


@dataclass
class RayConfig:
    """Ray Data embedding extraction: used when ``embed`` is true or ``address`` is set."""

    address: str | None = None  # a Ray cluster (``ray://...`` or ``auto``); None: local Ray
    embed: bool = False
    actors: int = bounded(2, ge=1)  # actor pool size: one model copy each
    gpus_per_actor: float = bounded(0.0, ge=0)  # e.g. 0.25 puts four actors on one GPU
    batch_size: int = bounded(64, ge=1)


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
    student: StudentConfig = field(default_factory=StudentConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    seed: int = bounded(0, ge=0)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    out: str | None = None
    cache_dir: str | None = None
    # a cached file that fails its checksum or does not load: rebuild it (named on stderr),
    # or stop with an error naming it
    on_damaged_cache: Literal["rebuild", "error"] = "rebuild"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- typed setting ------------------------------------------------------------------------------
def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, getattr(types, "UnionType", Union))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the declared type ``hint`` of key ``where``, or a ConfigError naming it.
    Numeric strings such as ``3e-3`` (which YAML 1.1 reads as text) become numbers."""
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{where}' must be set (got null)", key=where)
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"config key '{where}' must be one of {', '.join(map(str, choices))}, got {value!r}",
                              key=where)
        return value
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{where}' expects a number, got {value!r}", key=where)
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config key '{where}' expects a number, got {value!r}", key=where) from None
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"config key '{where}' expects an integer, got {value!r}", key=where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' expects true or false, got {value!r}", key=where)
        return value
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key '{where}' expects a string, got {value!r}", key=where)
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' expects a list, got {value!r}", key=where)
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' expects a mapping, got {value!r}", key=where)
        _, item = typing.get_args(hint) or (str, Any)
        if dataclasses.is_dataclass(item):
            return {str(k): from_mapping(item, v, f"{where}.{k}") for k, v in value.items()}
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def apply_mapping(obj: Any, data: Mapping[str, Any], where: str = "") -> Any:
    """Set every key of ``data`` on the dataclass ``obj`` (nested sections merge, other values
    replace), checking names and types; returns ``obj``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = _hints(type(obj))
    for key, value in data.items():
        key = str(key)
        if key not in fields:
            hint = ""
            if key == "overrides" and where in ("search", "student"):
                hint = f" (its settings are keys of '{where}' itself now, e.g. {where}.lr=0.1)"
            raise ConfigError(f"unknown config key '{_join(where, key)}'{hint}; known: {', '.join(fields)}",
                              key=_join(where, key))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            apply_mapping(current, value, _join(where, key))
        else:
            setattr(obj, key, _coerce(value, hints[key], _join(where, key)))
    return obj


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """A new ``cls`` (defaults) with ``data`` applied."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    return apply_mapping(cls(), data, where)


def set_value(cfg: Any, dotted: str, value: Any) -> Any:
    """Set ``a.b.c`` on a config; a key inside a mapping field (``dataset.options.split``) sets
    that entry of the mapping. Returns ``cfg``."""
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override key '{dotted}' is not of the form section.key")
    obj, path = cfg, ""
    for i, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(obj)]
        last = i == len(keys) - 1
        child = getattr(obj, key) if key in names else None
        if last or key not in names:  # an unknown key raises in apply_mapping, named
            apply_mapping(obj, {key: value}, path)
            return cfg
        if isinstance(child, dict):  # the rest of the key names an entry of the mapping
            updated = dict(child)
            _set_in_dict(updated, keys[i + 1:], value)
            setattr(obj, key, _coerce(updated, _hints(type(obj))[key], _join(path, key)))
            return cfg
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"override '{dotted}': '{_join(path, key)}' is not a section")
        obj, path = child, _join(path, key)
    return cfg


def _set_in_dict(d: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = d.get(key)
        d[key] = dict(nxt) if isinstance(nxt, dict) else {}
        d = d[key]
    d[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``3``, ``true``, ``[a, b]``, ``{x: 1}``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({err})") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``a.b=value`` overrides in order (later ones win)."""
    for item in overrides:
        set_value(cfg, *parse_override(item))
    return cfg


# -- validation ---------------------------------------------------------------------------------
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _check_number(value: Any, bounds: Mapping[str, float], where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{where}' must be a finite number, got {value}", key=where)
    for op, bound in bounds.items():
        sign, holds = _BOUNDS[op]
        if not holds(value, bound):
            raise ConfigError(f"config key '{where}' must be {sign} {bound:g}, got {value:g}", key=where)


def validate(obj: Any, where: str = "") -> Any:
    """Check every bound and every float for finiteness, recursively; returns ``obj``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(where, f.name)
        meta = {k: v for k, v in f.metadata.items() if k != "items"}
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    validate(v, f"{key}.{k}")
                else:
                    _check_number(v, meta if f.metadata.get("items") else {}, f"{key}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                _check_number(v, meta if f.metadata.get("items") else {}, f"{key}[{i}]")
        else:
            _check_number(value, meta, key)
    if isinstance(obj, RunConfig):
        _check_device(obj.device)
    return obj


def _check_device(device: str) -> None:
    d = str(device)
    if d in ("auto", "cpu", "cuda", "mps") or (d.startswith("cuda:") and d[5:].isdigit()):
        return
    raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {device!r}", key="device")


# -- files --------------------------------------------------------------------------------------
def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


def flat_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a mapping sets (``{"a": {"b": 1}}`` -> ``{"a", "a.b"}``)."""
    out: set[str] = set()
    for key, value in data.items():
        dotted = _join(prefix, str(key))
        out.add(dotted)
        if isinstance(value, Mapping):
            out |= flat_keys(value, dotted)
    return out


def blame(err: ConfigError, sources: list[tuple[str, set[str]]]) -> ConfigError:
    """``err`` prefixed with the source (a file, ``--set``, a preset) that last set its key."""
    if err.key is None or err.source is not None:
        return err
    key = err.key.split("[")[0]
    for label, keys in reversed(sources):
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys):
            return ConfigError(f"{label}: {err}", err.key, label)
    return err


@dataclass(frozen=True)
class ConfigLayer:
    """One source of settings (a file, a preset, a flag, ``--set``), applied over the ones
    before it: a nested ``mapping``, dotted ``values`` (``dataset.name`` switches the dataset:
    the previous one's options do not carry over) and ``key=value`` ``overrides``, in that order."""

    source: str  # what an error names: a path, "--task wikiart-style", "--root", "--set"
    mapping: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()

    def keys(self) -> set[str]:
        return flat_keys(self.mapping) | set(self.values) | {parse_override(o)[0] for o in self.overrides}

    def dataset_name(self) -> str | None:
        """The dataset this layer selects, if it does (the last word within the layer)."""
        name = None
        section = self.mapping.get("dataset")
        if isinstance(section, Mapping) and isinstance(section.get("name"), str):
            name = section["name"]
        if isinstance(self.values.get("dataset.name"), str):
            name = self.values["dataset.name"]
        for item in self.overrides:
            key, value = parse_override(item)
            if key == "dataset.name" and isinstance(value, str):
                name = value
        return name


def layered_config(layers: Sequence[ConfigLayer], check: Callable[[RunConfig], RunConfig] | None = None
                   ) -> RunConfig:
    """The one layering of a run config, for the CLI, tune trials and ``load_config``: defaults
    < the final dataset's own defaults (``dataset_defaults``) < each layer in order; then
    validated and passed to ``check``. An error names the layer that last set the offending key."""
    cfg = RunConfig()
    name = cfg.dataset.name
    for layer in layers:
        name = layer.dataset_name() or name
    layers = [ConfigLayer(f"the defaults of dataset '{name}'", dataset_defaults(name)), *layers]
    sources: list[tuple[str, set[str]]] = []
    for layer in layers:
        try:
            apply_mapping(cfg, layer.mapping)
            for key, value in layer.values.items():
                select_dataset(cfg, value) if key == "dataset.name" else set_value(cfg, key, value)
            apply_overrides(cfg, list(layer.overrides))
        except ConfigError as err:
            raise ConfigError(f"{layer.source}: {err}", err.key, layer.source) from None
        sources.append((layer.source, layer.keys()))
    try:
        cfg = validate(cfg)
        return check(cfg) if check is not None else cfg
    except ConfigError as err:
        raise blame(err, sources) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; validated. An error names the file
    when the file set the offending key."""
    layers = [ConfigLayer(str(path), read_yaml(path))] if path is not None else []
    return layered_config([*layers, ConfigLayer("--set", overrides=tuple(overrides or ()))])


# -- named presets ------------------------------------------------------------------------------
# ``--task NAME`` reproduces a query task of the paper's Table 1 (dataset + query set: 1000 test
# queries, class-balanced, condition != own class, >= 10 relevant items); ``--paper-recipe`` the
# paper's model and training settings (Implementations section): ImageNet ConvNeXt-base, frozen
# backbone, d = 256, 100 epochs, Adam with weight decay 1e-4, StepLR(30, 0.1), 224 px, crop + flips.
_TASK_QUERIES = {"n_queries": 1000, "min_relevant": 10, "query_split": "test", "database_split": "test"}
TASKS: dict[str, dict[str, Any]] = {
    "cub-bird": {"dataset": {"name": "cub", "options": {}}, "queries": {"sets": [["bird"]], **_TASK_QUERIES}},
    "apy-category": {"dataset": {"name": "apy", "options": {}},
                     "queries": {"sets": [["category"]], **_TASK_QUERIES}},
    "wikiart-style": {"dataset": {"name": "wikiart", "options": {}},
                      "queries": {"sets": [["style"]], **_TASK_QUERIES}},
    "wikiart-multi": {"dataset": {"name": "wikiart", "options": {}},
                      "queries": {"sets": [["style", "genre"]], **_TASK_QUERIES}},
}

PAPER_RECIPE: dict[str, Any] = {
    "model": {"backbone": "convnext_base", "pretrained": True, "finetune": False, "embed_dim": 256,
              "input_size": 224, "head_dropout": 0.4},
    "train": {"epochs": 100, "lr": 1e-3, "weight_decay": 1e-4, "lr_step": 30, "lr_gamma": 0.1, "augment": True},
}


# What a dataset needs by default, beneath everything the user sets (``cli.build_config``):
# emoji's images are real drawings, so it starts from the ImageNet-pretrained EfficientNet-Lite0
# that installs with the package (frozen; ``--set model.finetune=true`` fine-tunes it), fed
# at 128 px (the images are 64 px; 224 px costs 4x the time on a CPU for no extra detail);
# the domain-conversion lists query one list against another.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "emoji": {"model": {"backbone": "efficientnet_lite0", "pretrained": True, "finetune": False,
                        "input_size": 128, "embed_dim": 128}},
    "domains": {"queries": {"query_split": "query", "database_split": "database"}},
}


def dataset_defaults(name: str) -> dict[str, Any]:
    """The config a dataset starts from (empty for most)."""
    return DATASET_DEFAULTS.get(name, {})


def task_preset(name: str) -> dict[str, Any]:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name]


def select_dataset(cfg: RunConfig, name: str) -> RunConfig:
    """Switch to dataset ``name``; the options of another dataset do not carry over."""
    if name != cfg.dataset.name:
        cfg.dataset.options = {}
    cfg.dataset.name = str(name)
    return cfg
