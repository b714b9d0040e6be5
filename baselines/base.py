"""The composed-image-retrieval adapter seam and the weights convention (docs/baselines.md).

An adapter (``QueryComposer``) turns a reference image plus condition text into a query
vector, and database images into gallery vectors, in its own embedding space; the harness
(cir_bench.search.baseline) ranks and scores them with the same code as every other method.

Weights are never downloaded. The root folder is, first hit wins: an explicit argument
(``--weights-dir``), the config key ``baselines.weights_dir``, ``$CIR_BENCH_WEIGHTS``,
``~/.cache/cir-bench/weights``. Under it, one sub-folder per adapter holds the authors' files
under the authors' names.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from cir_bench.paths import default_weights_dir, file_sha256
from cir_bench.registry import Registry

BASELINES: Registry[type["QueryComposer"]] = Registry("baseline")  # classes with from_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adapters read local files only, never a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- weights -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsFile:
    """One file an adapter needs: where it lies under the root, who publishes it, licence."""

    path: str  # relative to the weights root, e.g. "searle/SEARLE_ViT-B32.pt"
    source: str  # where the authors publish it, in words
    licence: str
    min_bytes: int = 1024  # below this the file is certainly truncated
    alternatives: tuple[str, ...] = ()  # other accepted paths (e.g. open_clip's safetensors copy)
    kind: str = "checkpoint"  # or "text" (a vocabulary, a corpus), "npy" (numpy's .npy)
    # classes of the authors' code the checkpoint pickles ("module.Class"): loaded as inert
    # stubs; any other non-tensor global is refused (load_restricted)
    pickled_classes: tuple[str, ...] = ()

    def check(self, path: Path) -> None:
        """Refuse a file that cannot be these weights, without loading it: an HTML page, a
        truncated download, a damaged archive, a binary file where text belongs. The error
        says where to get the file again."""
        with _with_source(self):
            if self.kind == "text":
                check_text_file(path, self.min_bytes)
            elif self.kind == "npy":
                check_npy_file(path, self.min_bytes)
            else:
                check_file(path, self.min_bytes)

    def find(self, root: Path) -> Path | None:
        for rel in (self.path, *self.alternatives):
            if (root / rel).is_file():
                return root / rel
        return None


class MissingWeightsError(FileNotFoundError):
    """Weights an adapter needs are not on disk; the message says what to put where."""


class BadWeightsError(ValueError):
    """A weights file that exists but is not what it should be (HTML page, truncated, wrong keys)."""


def resolve_weights_root(explicit: str | Path | None = None, config: str | Path | None = None
                         ) -> tuple[Path, str]:
    """The weights root and which resolution step gave it."""
    if explicit:
        return Path(explicit).expanduser(), "--weights-dir"
    if config:
        return Path(config).expanduser(), "config baselines.weights_dir"
    if os.environ.get("CIR_BENCH_WEIGHTS"):
        return Path(os.environ["CIR_BENCH_WEIGHTS"]).expanduser(), "$CIR_BENCH_WEIGHTS"
    return default_weights_dir(), "default <cache root>/weights"


def require(name: str, files: Sequence[WeightsFile], root: Path, how: str) -> dict[str, Path]:
    """Resolved paths of ``files`` or a MissingWeightsError naming every missing one."""
    missing = [f for f in files if f.find(root) is None]
    if missing:
        lines = [f"{name}: missing weights under {root.resolve()} (root from {how}):"]
        for f in missing:
            alt = "".join(f"\n      or: {(root / a).resolve()}" for a in f.alternatives)
            lines.append(f"  - {(root / f.path).resolve()}{alt}\n      published: {f.source}\n      licence: {f.licence}")
        lines.append("Put the authors' files there under these names (cir-bench never downloads), or point "
                     "--weights-dir / $CIR_BENCH_WEIGHTS at the folder holding them; "
                     "`cir-bench check-weights` lists what is found.")
        raise MissingWeightsError("\n".join(lines))
    return {f.path: f.find(root) for f in files}  # type: ignore[misc]


def read_first_column(path: Path, spec: WeightsFile) -> list[str]:
    """The first column of every row of a CSV word list (``csv.reader``, a header row included),
    as the authors of FreeDom and BASIC read theirs; an empty file is named with where to get it."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row[0] for row in csv.reader(f) if row]
    if not rows:
        raise BadWeightsError(f"{path}: no rows; get {spec.source} again")
    return rows


def sha256(path: Path) -> str:
    return file_sha256(path)


def check_file(path: Path, min_bytes: int = 1024) -> None:
    """Refuse what cannot be a checkpoint before unpickling: an HTML page saved as .pt (Google
    Drive's confirmation page), a truncated download."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head.lstrip()[:1] == b"<":
        raise BadWeightsError(f"{path}: an HTML/XML page, not a checkpoint (a browser or Google Drive "
                              "confirmation page saved instead of the file); download it again")
    if size < min_bytes:
        raise BadWeightsError(f"{path}: {size} bytes, too small for these weights (truncated download?)")
    if path.suffix == ".safetensors":
        return
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise BadWeightsError(f"{path}: neither a torch zip archive nor a pickle (starts with {head[:8]!r})")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except zipfile.BadZipFile as err:
            raise BadWeightsError(f"{path}: damaged zip archive ({err}); truncated download?") from None
        if bad is not None:
            raise BadWeightsError(f"{path}: damaged member {bad} (truncated download?)")


def check_npy_file(path: Path, min_bytes: int = 128) -> None:
    """A numpy .npy file: not an HTML page, not truncated, numpy's magic first."""
    data = path.read_bytes()[:16]
    if data.lstrip()[:1] == b"<":
        raise BadWeightsError(f"{path}: an HTML/XML page, not the expected .npy file; download it again")
    if path.stat().st_size < min_bytes:
        raise BadWeightsError(f"{path}: {path.stat().st_size} bytes, too small (truncated download?)")
    if not data.startswith(b"\x93NUMPY"):
        raise BadWeightsError(f"{path}: not a numpy .npy file (starts with {data[:8]!r})")


def check_text_file(path: Path, min_bytes: int = 16) -> None:
    """A text file (a vocabulary): not an HTML page, not truncated, UTF-8."""
    data = path.read_bytes()
    if data.lstrip()[:1] == b"<":
        raise BadWeightsError(f"{path}: an HTML/XML page, not the expected text file; download it again")
    if len(data) < min_bytes:
        raise BadWeightsError(f"{path}: {len(data)} bytes, too small (truncated download?)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadWeightsError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _with_source(spec: WeightsFile | None):
    """Append where to get the file again to a BadWeightsError (damaged or wrong download)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except BadWeightsError as err:
            if spec is None:
                raise
            raise BadWeightsError(f"{err}\n  get it again from: {spec.source} (licence: {spec.licence})") from None

    return ctx()


def load_state(path: Path, spec: WeightsFile | None = None) -> Any:
    """A checkpoint read without running pickle code: safetensors, TorchScript archives (OpenAI
    CLIP files: their state dict) or ``torch.load(weights_only=True)``. ``spec``: the file's
    description, so that an error says where to get it again."""
    with _with_source(spec):
        return _load_state(path, spec.min_bytes if spec else 1024)


def _load_state(path: Path, min_bytes: int) -> Any:
    check_file(path, min_bytes)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") for n in names):  # TorchScript (OpenAI CLIP .pt)
            import warnings

            with warnings.catch_warnings():  # deprecated in torch, but it is how OpenAI ships CLIP
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
            return {k: v.float() for k, v in module.state_dict().items()}
    refused = unsafe_globals(path)
    if refused:
        raise UnsafeWeightsError(path, refused)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a legacy file naming a global outside the allow-list
        raise UnsafeWeightsError(path, ["a global outside the weights-only allow-list"]) from None


class _Stub:
    """An inert stand-in for a class of the authors' code that a checkpoint pickles (CoVR's
    learning-rate schedule): it keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class UnsafeWeightsError(BadWeightsError):
    """A checkpoint whose pickle asks for globals outside the allow-list: refused before
    anything in it is unpickled."""

    def __init__(self, path: Path, refused: Sequence[str]) -> None:
        self.path, self.refused = Path(path), tuple(refused)
        shown = ", ".join(self.refused[:8]) + ("…" if len(self.refused) > 8 else "")
        super().__init__(f"{path}: refused before loading: its pickle asks for {shown}, which a weights file "
                         "never needs (loading it could run code); this is not the authors' checkpoint")


def unsafe_globals(path: Path, allowed: Sequence[str] = ()) -> list[str] | None:
    """The globals ``path``'s pickle names that neither ``torch.load(weights_only=True)`` nor
    ``allowed`` accepts, read from its opcodes without unpickling; None for a legacy
    (non-zip) file, which the weights-only unpickler itself guards."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, KeyError, zipfile.BadZipFile) as err:
        raise BadWeightsError(f"{path}: not a torch checkpoint ({err})") from None
    return [n for n in names if n not in allowed]


def load_restricted(path: Path, spec: WeightsFile | None = None) -> Any:
    """``torch.load(weights_only=True)`` for checkpoints that pickle a few objects of the
    authors' code (``spec.pickled_classes``, e.g. a Lightning/Fabric .ckpt's schedule): those
    exact classes load as inert stubs, tensors and plain data as torch allows them; any
    other global is refused, naming the file and the global, before anything is unpickled."""
    with _with_source(spec):
        check_file(path, spec.min_bytes if spec else 1024)
    allowed = spec.pickled_classes if spec else ()
    refused = unsafe_globals(path, allowed)
    if refused:
        raise UnsafeWeightsError(path, refused)
    stubs = [(type(name.rsplit(".", 1)[-1], (_Stub,), {"__module__": "cir_bench.stub"}), name) for name in allowed]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a legacy file naming a global outside the allow-list
        raise UnsafeWeightsError(path, ["a global outside the weights-only allow-list"]) from None
    except (RuntimeError, EOFError) as err:
        with _with_source(spec):
            raise BadWeightsError(f"{path}: cannot be read ({err}); truncated or damaged download?") from None


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the missing, unexpected and misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise BadWeightsError(f"{what}: the checkpoint does not fit the model; missing {missing[:8]}"
                              f"{'…' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{'…' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:8]}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# -- the adapter seam --------------------------------------------------------------------------
class QueryComposer(ABC):
    """Reference image + condition text -> query vector; image -> gallery vector.

    Eval mode and inference mode always; batching inside; outputs on the CPU, float32,
    L2-normalised. ``prompt_template`` wraps the condition text T (e.g. ``a photo of $ that {T}``).
    """

    name: str = "composer"
    similarity: str = "cosine"
    prompt_template: str = "{T}"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights: dict[str, dict[str, Any]] = {}  # path -> {"sha256", "bytes"}: provenance
        self.notes: list[str] = []  # e.g. "architecture differs from the authors'"

    # subclasses implement these three
    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    @abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> (B, D) gallery vectors, not yet normalised."""

    @abstractmethod
    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3, H, W) reference images + the full prompts -> (B, D), not yet normalised."""

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @staticmethod
    def required_files(**options: Any) -> list[WeightsFile]:
        """The files ``from_weights`` reads (for check-weights and the missing-weights rows)."""
        raise NotImplementedError

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, **options: Any) -> "QueryComposer":
        raise NotImplementedError

    @classmethod
    def from_modules(cls, *modules: Any, **kwargs: Any) -> "QueryComposer":
        """The adapter around modules built in code (tests, custom checkpoints): the same
        forward code as ``from_weights``, no files read."""
        return cls(*modules, **kwargs)

    #: where the condition text comes from: "template" (T1/T2/T3), "labels" (a photo of {labels})
    #: or "words" (the bare label phrases, FreeDom's domain word)
    text_source: str = "template"

    def describe(self) -> dict[str, Any]:
        """What identifies this adapter's outputs (cache key, manifest)."""
        return {"name": self.name, "prompt_template": self.prompt_template}

    # shared behaviour
    def condition_text(self, dataset: str, conditions: Sequence[Sequence[tuple[str, str]]],
                       template: str = "T1") -> list[str]:
        """The exact strings the text encoder receives, one per query: each query's list of
        (property, label) conditions -> T (baselines/condition_text.py) -> this method's prompt."""
        from cir_bench_baselines.condition_text import condition_text, label_text, word_text

        if self.text_source == "labels":
            return self.prompts([label_text(dataset, c) for c in conditions])
        if self.text_source == "words":
            return self.prompts([word_text(dataset, c) for c in conditions])
        return self.prompts([condition_text(dataset, c, template) for c in conditions])

    def prompts(self, texts: Sequence[str]) -> list[str]:
        """The exact strings the text encoder receives for condition texts T."""
        return [self.prompt_template.format(T=t) for t in texts]

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, start + self.batch_size)

    @torch.inference_mode()
    def encode_gallery(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = [self._encode_images(self.preprocess(images[sl]).to(self.device)).float()
               for sl in self._batches(len(images))]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu() if out else torch.zeros(0, self.embed_dim)

    @torch.inference_mode()
    def encode_query(self, images: Sequence[Image.Image], texts: Sequence[str], wrapped: bool = False
                     ) -> torch.Tensor:
        """Query vectors for reference images and condition texts T (``wrapped``: the texts are
        already the full prompts, as ``condition_text`` returns them)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} reference images but {len(texts)} condition texts")
        prompts = list(texts) if wrapped else self.prompts(texts)
        out = [self._encode_queries(self.preprocess(images[sl]).to(self.device), prompts[sl]).float()
               for sl in self._batches(len(images))]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu() if out else torch.zeros(0, self.embed_dim)

    def score(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return queries @ gallery.T

    def query_scores(self, images: Sequence[Image.Image], prompts: Sequence[str], gallery: torch.Tensor
                     ) -> torch.Tensor:
        """(Q, N) similarities of each query (reference image + full prompt) to the gallery: what
        the harness ranks. One query vector scored against the gallery, unless the method fuses
        two similarities (``clip-product``) or composes its query from the gallery (FreeDom)."""
        return self.score(self.encode_query(images, prompts, wrapped=True), gallery)

    def use_cache(self, folder: Path) -> None:
        """Where the adapter may keep what it computes once per weights (FreeDom's corpus features)."""

    def cache_key(self) -> str:
        """Adapter + weights (sha256) + preprocessing: gallery vectors depend on all three."""
        blob = repr(sorted(self.describe().items())) + repr(sorted((k, v["sha256"]) for k, v in self.weights.items()))
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def _record(self, paths: dict[str, Path]) -> None:
        for rel, path in paths.items():
            self.weights[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}

    def eval_mode(self, *modules: torch.nn.Module) -> None:
        for m in modules:
            m.eval().to(self.device)
            for p in m.parameters():
                p.requires_grad_(False)


class FusedScores:
    """For adapters that rank without one query vector, by a fusion of similarities
    (``clip-product``, BASIC) or a query built from the gallery (FreeDom): ``query_scores`` checks
    the batch and calls the adapter's ``fused_scores``; ``encode_query`` has nothing to return."""

    name: str

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise TypeError(f"{self.name} has no single query vector (it fuses similarities or reads the gallery): "
                        "use query_scores")

    @torch.no_grad()  # not inference mode: the harness masks the scores in place
    def query_scores(self, images: Sequence[Image.Image], prompts: Sequence[str], gallery: torch.Tensor
                     ) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} reference images but {len(prompts)} condition texts")
        return self.fused_scores(images, list(prompts), gallery.float())

    def fused_scores(self, images: Sequence[Image.Image], prompts: list[str], gallery: torch.Tensor
                     ) -> torch.Tensor:
        raise NotImplementedError


def get_composer(name: str, weights_dir: str | Path | None = None, **options: Any) -> QueryComposer:
    """Build a registered adapter from its weights (``from_weights``)."""
    return BASELINES.get(name).from_weights(weights_dir=weights_dir, **options)
