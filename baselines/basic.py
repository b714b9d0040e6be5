"""BASIC (Psomas et al., NeurIPS 2025; billpsomas/icir, code MIT, read at 463cc1d): training-free
composed retrieval on a frozen CLIP, as its ``calculate_rankings`` runs with the ``basic`` preset
of run_retrieval.py. All CLIP features L2-normalised; T the bare label phrase ("sketch"):

1. text: the mean of the normalised encodings of "{w} {T}" and "{T} {w}" over the first 100 rows
   w of the subjects corpus, normalised (their "contextualize");
2. centring: images (query and gallery) minus the LAION-1M image mean, texts (query and both
   corpora) minus the mean of the subjects corpus;
3. projection P = V V^T onto the leading (at most 250, positive) eigenvectors of
   (1 - a) S_subjects - a S_styles + 1e-5 (S: the centred corpora's scatter / (n - 1), a = 0.2);
4. query expansion: the 25 gallery items nearest the projected query and the query itself,
   weighted by softmax(0.1 * similarity) (the query's similarity taken as 1), projected by P;
5. s_img = expanded query . centred gallery, s_txt = centred text . centred gallery, both
   shifted by the minima m_img, m_txt of the same similarities on the authors' synthetic set
   and divided by |m_img|, clipped at 0; score = s_txt s_img - 0.1 (s_txt + s_img)^2.

Backbone: OpenAI ViT-L/14 at 224 px (``clip/ViT-L-14.pt``). Files the user places under
``basic/`` (from the repository: corpora/, data/laion_mean/, synthetic_data/):
``generic_subjects.csv``, ``generic_styles.csv``, ``laion_1m_mean_clip.pkl`` (a pickled dict
holding a torch tensor: read with an unpickler that allows only a tensor's rebuild, the inner
bytes through ``torch.load(weights_only=True)``) and ``dataset_1_sd_clip.pkl.npy`` (``np.save`` of
a dict with ``image_features`` and ``text_features``: read with an unpickler that allows only
numpy's array rebuild). Every row of a corpus file counts, its header row included, as the
authors read them.
"""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from cir_bench_baselines.base import BASELINES, BadWeightsError, FusedScores, WeightsFile, load_state, \
    read_first_column, require, resolve_weights_root
from cir_bench_baselines.clip_common import CLIPComposer, build_clip
from cir_bench_baselines.searle import clip_file

SOURCE = "github.com/billpsomas/icir"
LICENCE = "MIT (the repository's code licence)"
SUBJECTS = WeightsFile("basic/generic_subjects.csv", f"corpora/generic_subjects.csv of {SOURCE}", LICENCE,
                       min_bytes=16, kind="text")
STYLES = WeightsFile("basic/generic_styles.csv", f"corpora/generic_styles.csv of {SOURCE}", LICENCE, min_bytes=16,
                     kind="text")
LAION_MEAN = WeightsFile("basic/laion_1m_mean_clip.pkl", f"data/laion_mean/laion_1m_mean_clip.pkl of {SOURCE}",
                         LICENCE, min_bytes=256)
SYNTHETIC = WeightsFile("basic/dataset_1_sd_clip.pkl.npy", f"synthetic_data/dataset_1_sd_clip.pkl.npy of {SOURCE}",
                        LICENCE, min_bytes=256, kind="npy")
CONTEXT_WORDS = 100  # rows of the subjects corpus that contextualise a text (save_icir)
EXPANSION = 25  # gallery items of the query expansion (hard-coded by the authors)


class _Restricted(pickle.Unpickler):
    """An unpickler that builds only the listed globals; anything else is refused, named."""

    def __init__(self, data: bytes, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _tensor_globals() -> dict[tuple[str, str], Any]:
    return {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch.storage", "_load_from_bytes"): lambda b: torch.load(io.BytesIO(b), weights_only=True)}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(module, "_reconstruct")] = multiarray._reconstruct
        out[(module, "scalar")] = multiarray.scalar
    return out


def read_laion_mean(path: Path) -> torch.Tensor:
    """The (D,) LAION-1M image mean of laion_1m_mean_clip.pkl ({'laion_1m_mean': tensor (1, D)})."""
    LAION_MEAN.check(path)
    try:
        data = _Restricted(path.read_bytes(), _tensor_globals()).load()
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        raise BadWeightsError(f"{path}: not the authors' LAION mean ({err}); get {LAION_MEAN.source} again") from None
    if not isinstance(data, dict) or not isinstance(data.get("laion_1m_mean"), torch.Tensor):
        raise BadWeightsError(f"{path}: expected {{'laion_1m_mean': tensor}}; get {LAION_MEAN.source} again")
    return data["laion_1m_mean"].float().reshape(-1)


def read_synthetic(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """image_features, text_features of the authors' synthetic set (an .npy of a pickled dict)."""
    SYNTHETIC.check(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as err:
            raise BadWeightsError(f"{path}: not an .npy file ({err}); get {SYNTHETIC.source} again") from None
        rest = f.read()
    if dtype != np.dtype(object) or shape != ():
        raise BadWeightsError(f"{path}: expected the authors' np.save of a dict, found an array {dtype} {shape}")
    try:
        data = _Restricted(rest, {**_numpy_globals(), **_tensor_globals()}).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise BadWeightsError(f"{path}: refused or damaged ({err}); get {SYNTHETIC.source} again") from None
    if isinstance(data, np.ndarray) and data.shape == ():  # np.save pickles the 0-d array itself
        data = data.item()
    if not isinstance(data, dict) or not {"image_features", "text_features"} <= set(data):
        raise BadWeightsError(f"{path}: expected a dict with image_features and text_features")
    return (torch.as_tensor(np.asarray(data["image_features"]), dtype=torch.float32),
            torch.as_tensor(np.asarray(data["text_features"]), dtype=torch.float32))


def contrastive_projection(subjects: torch.Tensor, styles: torch.Tensor, aa: float, components: int) -> torch.Tensor:
    """P = V V^T, V the leading eigenvectors (at most ``components``, positive eigenvalues only) of
    (1 - aa) S_a - aa S_b + 1e-5, S the scatter / (n - 1) of the centred corpora."""
    sa = subjects.T @ subjects / (subjects.shape[0] - 1)
    sb = styles.T @ styles / (styles.shape[0] - 1)
    values, vectors = torch.linalg.eigh((1 - aa) * sa - aa * sb + 1e-5)
    values, vectors = values.flip(dims=[0]), vectors.flip(dims=[1])
    kept = vectors[:, :min(int(components), int((values > 0).sum()))]
    return kept @ kept.T


class BASIC(FusedScores, CLIPComposer):
    name = "basic"
    text_source = "words"

    def __init__(self, clip: nn.Module, subjects: Sequence[str], styles: Sequence[str], laion_mean: torch.Tensor,
                 synthetic: tuple[torch.Tensor, torch.Tensor], image_size: int, backbone: str = "ViT-L-14",
                 aa: float = 0.2, components: int = 250, harris_lambda: float = 0.1, device: str = "cpu",
                 batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size)
        if laion_mean.numel() != self.embed_dim:
            raise BadWeightsError(f"basic: the LAION mean has {laion_mean.numel()} dimensions, the backbone "
                                  f"{self.embed_dim}: the files belong to another backbone")
        self.subjects, self.styles, self.backbone = list(subjects), list(styles), backbone
        self.laion_mean, self.synthetic = laion_mean.float(), synthetic
        self.aa, self.components, self.harris_lambda = float(aa), int(components), float(harris_lambda)
        self._fixed: dict[str, Any] | None = None
        self._texts: dict[str, torch.Tensor] = {}

    @staticmethod
    def required_files(backbone: str = "ViT-L-14", **_: Any) -> list[WeightsFile]:
        return [clip_file(backbone), SUBJECTS, STYLES, LAION_MEAN, SYNTHETIC]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, backbone: str = "ViT-L-14",
                     config_dir: str | None = None, device: str = "cpu", batch_size: int = 32,
                     **settings: Any) -> "BASIC":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(backbone)
        paths = require(cls.name, files, root, how)
        clip_path, subjects, styles, mean, synthetic = (paths[f.path] for f in files)
        for spec, path in ((SUBJECTS, subjects), (STYLES, styles)):
            spec.check(path)
        clip, cfg = build_clip(load_state(clip_path, files[0]), str(clip_path))
        out = cls(clip, read_first_column(subjects, SUBJECTS), read_first_column(styles, STYLES), read_laion_mean(mean),
                  read_synthetic(synthetic), cfg["vision_cfg"]["image_size"], backbone, device=device,
                  batch_size=batch_size, **settings)
        return out.finish(paths, cfg, backbone)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backbone": self.backbone, "aa": self.aa, "components": self.components,
                "harris_lambda": self.harris_lambda}

    def fixed(self) -> dict[str, Any]:
        """What every query shares: the means, the projection, the synthetic set's minima."""
        if self._fixed is None:
            subjects, styles = self.encode_texts(self.subjects), self.encode_texts(self.styles)
            mean_text = subjects.mean(dim=0)
            image_gen, text_gen = (torch.nn.functional.normalize(t, dim=-1) for t in self.synthetic)
            image_gen, text_gen = image_gen - self.laion_mean, text_gen - mean_text
            self._fixed = {"mean_text": mean_text,
                           "projection": contrastive_projection(subjects - mean_text, styles - mean_text, self.aa,
                                                                self.components),
                           "min_image": float((image_gen @ image_gen.T).min()),
                           "min_text": float((text_gen @ image_gen.T).min())}
        return self._fixed

    def contextual_text(self, text: str) -> torch.Tensor:
        """normalize(mean over w of normalize(E("{w} {text}")) and normalize(E("{text} {w}")))."""
        if text not in self._texts:
            words = self.subjects[:CONTEXT_WORDS]
            both = self.encode_texts([f"{w} {text}" for w in words] + [f"{text} {w}" for w in words])
            self._texts[text] = torch.nn.functional.normalize(both.mean(dim=0), dim=-1)
        return self._texts[text]

    def fused_scores(self, images: Sequence[Image.Image], prompts: list[str], gallery: torch.Tensor) -> torch.Tensor:
        fixed = self.fixed()
        projection = fixed["projection"]
        centred = gallery - self.laion_mean
        query = self.encode_gallery(images) - self.laion_mean
        text = torch.stack([self.contextual_text(p) for p in prompts]) - fixed["mean_text"]
        near, which = torch.topk((query @ projection) @ centred.T, min(EXPANSION, centred.shape[0]), dim=1)
        members = torch.cat([centred[which], query[:, None]], dim=1)
        weights = torch.exp(0.1 * torch.cat([near, torch.ones(len(query), 1)], dim=1))
        expanded = ((members * (weights / weights.sum(dim=1, keepdim=True))[..., None]).sum(dim=1)) @ projection
        scale = abs(fixed["min_image"])
        s_img = ((expanded @ centred.T - fixed["min_image"]) / scale).clamp(min=0)
        s_txt = ((text @ centred.T - fixed["min_text"]) / scale).clamp(min=0)
        return s_txt * s_img - self.harris_lambda * (s_txt + s_img) ** 2


BASELINES.register("basic")(BASIC)
