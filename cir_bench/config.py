"""Run configuration: pydantic sections (``Section``) loadable from YAML, with
``key.sub=value`` overrides.

The layers (defaults, presets, files, flags) are merged and the whole config is checked once
(types, choices, ``Field`` bounds, finiteness, unknown keys) before any work: a mistyped or
out-of-range value fails at once with its key named, and the layer that set it.

Precedence, whatever the order of the flags on the command line (``cli.build_config``):
defaults < ``--task`` < ``--paper-recipe`` < ``--config FILE`` < named flags (``--dataset``,
``--root``, ``--preset``, ``--seed``, ...) < ``--set KEY=VALUE`` (in the order given).
Dataset options belong to a dataset: a ``--dataset`` that changes the dataset drops the
options set for the previous one (before any ``--set dataset.options.*``).

Every random choice in a run takes its seed from here (``RunConfig.seed`` unless a section
sets its own), so a config file plus the package versions reproduce a run.
"""
from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError


# -- sections on pydantic (the run config here, tune experiments, the serve settings) ------------
# A section is checked as a whole once its layers are merged (``parse``), so an error names the
# first offending key in field order, found from the error's location; ``blame`` then names the
# layer that set it.
class ConfigError(ValueError):
    """A configuration file or override names an unknown key or holds a bad value; ``key``:
    the dotted key at fault (list items as ``key[i]``) when one is, ``source``: the file or
    flag that set it, once known."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key, self.source = key, source


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too, no NaN
    or infinity, and numbers are read as text where text is expected (``--set dataset.root=2024``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              coerce_numbers_to_str=True)


S = TypeVar("S", bound=Section)


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unwrap(hint: Any) -> Any:
    """``X`` of ``X | None`` and of ``Annotated[X, ...]``."""
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            hint = typing.get_args(hint)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) != 1:
                return hint
            hint = args[0]
        else:
            return hint


def _section_type(hint: Any) -> type[BaseModel] | None:
    hint = _unwrap(hint)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def _hint_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The declared type at an error location (a field, a list item, a mapping value), or None."""
    hint: Any = cls
    for part in loc:
        hint = _unwrap(hint)
        section = _section_type(hint)
        if section is not None and isinstance(part, str):
            field = section.model_fields.get(part)
            if field is None:
                return None
            hint = field.annotation
        elif typing.get_origin(hint) is list and isinstance(part, int):
            hint = typing.get_args(hint)[0]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            return None
    return _unwrap(hint)


def dotted_key(loc: tuple[Any, ...]) -> str:
    """``("eval", "lambdas", 0)`` -> ``eval.lambdas[0]``."""
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else join(out, str(part))
    return out


def merge(cls: type[BaseModel], data: Mapping[str, Any], update: Any, where: str = "") -> dict[str, Any]:
    """``update`` over ``data`` (mappings of a section): nested sections merge, every other value
    (a list, a free mapping such as ``dataset.options``) is replaced."""
    if not isinstance(update, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(update).__name__}", key=where or None)
    out = dict(data)
    for key, value in update.items():
        key = str(key)
        field = cls.model_fields.get(key)
        section = _section_type(field.annotation) if field is not None else None
        if section is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(section, out[key], value, join(where, key))
        else:
            out[key] = value
    return out


def set_dotted(cls: type[BaseModel], data: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``data`` with ``a.b.c`` set to ``value``; a key below a mapping field (``dataset.options.split``)
    sets that entry of the mapping."""
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override key '{dotted}' is not of the form section.key")
    out = dict(data)
    node, section, path = out, cls, ""
    for key in keys[:-1]:
        path = join(path, key)
        field = section.model_fields.get(key) if section is not None else None
        child = node.get(key)
        if isinstance(child, Mapping):
            node[key] = dict(child)
        elif child is None and (field is None or _section_type(field.annotation) is not None
                                or typing.get_origin(_unwrap(field.annotation)) is dict):
            node[key] = {}  # an unknown key is named by the check; an unset section starts empty
        else:
            raise ConfigError(f"override '{dotted}': '{path}' is not a section", key=path)
        node = node[key]
        section = _section_type(field.annotation) if field is not None else None
    node[keys[-1]] = value
    return out


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
           "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
_EXPECTS = {"float": "a number", "int": "an integer", "bool": "true or false", "string": "a string",
            "list": "a list", "dict": "a mapping"}


def config_error(cls: type[BaseModel], err: ValidationError) -> ConfigError:
    """The first error of a section's check, worded for the user, its key from the error's location."""
    first = err.errors(include_url=False)[0]
    loc, kind, value = tuple(first["loc"]), first["type"], first.get("input")
    ctx = first.get("ctx") or {}
    key = dotted_key(loc)
    if kind == "extra_forbidden":
        parent = _section_type(_hint_at(cls, loc[:-1]))
        known = ", ".join(parent.model_fields) if parent is not None else ""
        hint = ""
        if loc[-1] == "overrides" and loc[:-1] in (("search",), ("student",)):
            hint = f" (its settings are keys of '{loc[0]}' itself now, e.g. {loc[0]}.lr=0.1)"
        return ConfigError(f"unknown config key '{key}'{hint}; known: {known}", key=key)
    if kind == "literal_error":
        hint = _hint_at(cls, loc)
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        return ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}", key=key)
    if kind in _BOUNDS:
        sign, name = _BOUNDS[kind]
        return ConfigError(f"config key '{key}' must be {sign} {_number(ctx[name])}, got {_number(value)}", key=key)
    if kind == "finite_number":
        return ConfigError(f"config key '{key}' must be a finite number, got {value}", key=key)
    if kind in ("model_type", "model_attributes_type"):
        return ConfigError(f"{key or 'config'}: expected a mapping, got {type(value).__name__}", key=key or None)
    if kind == "value_error":
        return ConfigError(f"config key '{key}' {ctx.get('error')}, got {value!r}", key=key)
    expected = _EXPECTS.get(kind.split("_")[0])
    if expected is not None:
        return ConfigError(f"config key '{key}' expects {expected}, got {value!r}", key=key)
    return ConfigError(f"config key '{key}': {first['msg']}, got {value!r}", key=key)


def parse(cls: type[S], data: Any) -> S:
    """A checked ``cls`` from a mapping (missing keys take their defaults), or the ConfigError of
    its first bad key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise config_error(cls, err) from None


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
        dotted = join(prefix, str(key))
        out.add(dotted)
        if isinstance(value, Mapping):
            out |= flat_keys(value, dotted)
    return out


# -- the run config ------------------------------------------------------------------------------
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


# bounds of list items and mapping values
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class DatasetConfig(Section):
    name: str = "synthart"
    root: str | None = None  # folder of a dataset on disk (real datasets)
    # loader options (`cir-bench list datasets`; README "Datasets on disk"); SynthArt: preset
    # (tiny | small | default, default "default") and generator parameters
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Section):
    backbone: str = "small_cnn"
    pretrained: bool = False
    weights: str | None = None  # explicit path to backbone weights (pretrained=True)
    embed_dim: int = Field(128, ge=1)
    finetune: bool = True  # False: backbone frozen (eval mode, no gradients)
    input_size: int | None = Field(None, ge=8)  # None: the dataset's native size, else the backbone's
    head_hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 128])
    encoder_dropout: float = Field(0.1, ge=0, lt=1)
    head_dropout: float = Field(0.2, ge=0, lt=1)  # the authors' heads use 0.4; 0.2 fits the small demo set


class TrainConfig(Section):
    # defaults sized for the SynthArt demo on 2 CPU cores; the paper trains 100 epochs
    # with StepLR(30, 0.1) and weight decay 1e-4 (--paper-recipe)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    lr_step: int = Field(30, ge=1)  # StepLR step size in epochs
    lr_gamma: float = Field(0.1, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)  # held out of the train split for the val accuracy
    property_weights: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # w_i of Eq 1; default 1
    augment: bool = False
    num_workers: int = Field(0, ge=0)


class QueryConfig(Section):
    # one query set per entry; None: the dataset's default (its first property alone, and
    # its first two together: on SynthArt style, and style+shape like WikiArt-multi)
    sets: list[list[str]] | None = None
    n_queries: int = Field(200, ge=1)
    min_relevant: int = Field(10, ge=1)
    min_jaccard: float | None = Field(None, ge=0, le=1)  # the paper's tag filter (0.1), off as in the authors' code
    query_split: str = "test"
    database_split: str = "test"  # the paper retrieves from the test split
    seed: int | None = Field(None, ge=0)  # None: the run seed
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


class EvalConfig(Section):
    k: int = Field(10, ge=1)
    self_match: Literal["exclude", "keep"] = "exclude"  # keep: the authors' code
    # a name, or {method: NAME, label: ..., **params}; "backward" takes its settings from
    # the `search` section, entries may override any of them
    methods: list[Any] = Field(default_factory=_default_methods)
    lambdas: list[NonNegativeFloat] | None = None  # --lambda: one Backward Search entry each
    # the λ curve: the run's Backward Search and Eq 4 solved to its tolerance at each λ
    # (lambda_curve.parquet; [] for none)
    lambda_curve: list[NonNegativeFloat] = Field(default_factory=lambda: list(LAMBDA_CURVE))
    lambda_curve_solvers: list[Literal["preset", "converged"]] = field(
        default_factory=lambda: ["preset", "converged"])
    search_batch: int = Field(1024, ge=1)
    # search backend (cir_bench/index/): "exact" (torch, tie-stable) or "faiss" with
    # index_options {factory: "Flat" | "HNSW32" | "IVF256,Flat", nprobe, ef_search}
    index: str = "exact"
    index_options: dict[str, Any] = Field(default_factory=dict)


class SearchConfig(Section):
    """Backward Search (search/backward.py), also the student's teacher. ``preset`` sets every
    field left at None; a value given here overrides the preset's."""

    preset: BackwardPreset = "paper"
    lam: float = Field(0.005, ge=0)  # sum-L1 over 128 dims: 0.005 here is 0.64 in the authors' mean-L1 units
    regularizer: Regularizer | None = None
    reduction: Reduction | None = None
    optimizer: Optimizer | None = None
    lr: float | None = Field(None, gt=0)
    max_iter: int | None = Field(None, ge=0)
    condition_weights: dict[str, NonNegativeFloat] = Field(default_factory=dict)  # w_m, default 1
    average_conditions: bool | None = None
    stopping: StoppingRule | None = None
    confidence: float | None = Field(None, ge=0, lt=1)
    patience: int | None = Field(None, ge=1)
    min_delta: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)  # queries per chunk: bounds memory
    tol: float | None = Field(None, gt=0)  # converged: the gradient mapping of the accepted step to reach
    budget_confidence: float | None = Field(None, gt=0, lt=1)  # converged at λ = 0: stop at p(c|z) >= this
    # how the loop runs (not what it computes; not part of the cache keys): auto = a captured
    # CUDA graph on CUDA, the eager shrinking loop on CPU; fixed = the masked fixed-shape loop
    # uncaptured; eager/fixed turn capture off
    engine: Engine | None = None
    check_every: int | None = Field(None, ge=0)  # fixed/graph: read the stop mask every N steps (0: never)
    # how dL/dz is taken (likewise not in the cache keys): auto = by hand through heads that are
    # Linear/ReLU/BatchNorm chains (autograd's arithmetic, fewer kernels), autograd otherwise
    gradient: Gradient | None = None
    # the fixed-shape step through torch.compile (fused kernels; compiled once per bucket and
    # settings, seconds each, λ excluded; on CUDA captured after); engine auto then picks fixed on CPU
    compile: bool | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields that override the preset (what ``BackwardSearch(preset, **...)`` takes)."""
        out = {name: getattr(self, name) for name in type(self).model_fields
               if name not in ("preset", "lam", "condition_weights") and getattr(self, name) is not None}
        if self.condition_weights:
            out["condition_weights"] = dict(self.condition_weights)
        return out


class StudentConfig(Section):
    """The distilled student (models/student.py) and its distillation."""

    # "cir-bench": the MLP below; "authors": the authors' network (sigmoid, BN, tanh output,
    # 128 wide, no dropout; hidden/bottleneck/dropout unused), with residual=false as they do
    architecture: Literal["cir-bench", "authors"] = "cir-bench"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [256, 128])  # encoder widths; decoder mirrors
    bottleneck: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    # predict z* - z0 and add z0 back (a named deviation: the paper predicts z* directly)
    residual: bool = True
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=2)  # BatchNorm needs two rows
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class RayConfig(Section):
    """Ray Data embedding extraction: used when ``embed`` is true or ``address`` is set."""

    address: str | None = None  # a Ray cluster (``ray://...`` or ``auto``); None: local Ray
    embed: bool = False
    actors: int = Field(2, ge=1)  # actor pool size: one model copy each
    gpus_per_actor: float = Field(0.0, ge=0)  # e.g. 0.25 puts four actors on one GPU
    batch_size: int = Field(64, ge=1)


class BaselinesConfig(Section):
    """CoIR baselines of ``cir-bench compare`` (baselines/)."""

    weights_dir: str | None = None  # root of the authors' files; --weights-dir overrides it
    # per-adapter options, e.g. {clip4cir: {variant: fiq}, clip-sum: {backbone: ViT-B-32}}
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


def _check_device(device: str) -> str:
    if device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError("must be auto, cpu, cuda or cuda:N")


class RunConfig(Section):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    queries: QueryConfig = Field(default_factory=QueryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    seed: int = Field(0, ge=0)
    device: Annotated[str, AfterValidator(_check_device)] = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    out: str | None = None
    cache_dir: str | None = None
    # a cached file that fails its checksum or does not load: rebuild it (named on stderr),
    # or stop with an error naming it
    on_damaged_cache: Literal["rebuild", "error"] = "rebuild"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# -- layering -----------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``3``, ``true``, ``[a, b]``, ``{x: 1}``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({err})") from None


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

    def dotted(self) -> list[tuple[str, Any]]:
        return [*self.values.items(), *(parse_override(o) for o in self.overrides)]

    def keys(self) -> set[str]:
        return flat_keys(self.mapping) | {key for key, _ in self.dotted()}

    def dataset_name(self) -> str | None:
        """The dataset this layer selects, if it does (the last word within the layer)."""
        name = None
        section = self.mapping.get("dataset")
        if isinstance(section, Mapping) and isinstance(section.get("name"), str):
            name = section["name"]
        for key, value in self.dotted():
            if key == "dataset.name" and isinstance(value, str):
                name = value
        return name

    def apply(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The run config's data with this layer over it (checked later, as a whole)."""
        data = merge(RunConfig, data, self.mapping)
        for key, value in self.dotted():
            if key == "dataset.name" and isinstance(data.get("dataset"), Mapping) \
                    and value != data["dataset"].get("name"):
                data = set_dotted(RunConfig, data, "dataset.options", {})
            data = set_dotted(RunConfig, data, key, value)
        return data


def layered_config(layers: Sequence[ConfigLayer], check: Callable[[RunConfig], RunConfig] | None = None
                   ) -> RunConfig:
    """The one layering of a run config, for the CLI, tune trials and ``load_config``: defaults
    < the final dataset's own defaults (``dataset_defaults``) < each layer in order; then
    checked as a whole and passed to ``check``. An error names the layer that last set the
    offending key (found from the key of the error's location)."""
    name = DatasetConfig().name
    for layer in layers:
        name = layer.dataset_name() or name
    layers = [ConfigLayer(f"the defaults of dataset '{name}'", dataset_defaults(name)), *layers]
    data: dict[str, Any] = RunConfig().model_dump()
    sources: list[tuple[str, set[str]]] = []
    for layer in layers:
        try:
            data = layer.apply(data)
        except ConfigError as err:
            raise ConfigError(f"{layer.source}: {err}", err.key, layer.source) from None
        sources.append((layer.source, layer.keys()))
    try:
        cfg = parse(RunConfig, data)
        return check(cfg) if check is not None else cfg
    except ConfigError as err:
        raise blame(err, sources) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; checked. An error names the file
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
