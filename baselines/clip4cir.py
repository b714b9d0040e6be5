"""CLIP4CIR (Baldrati et al., ACM TOMM 2023): fine-tuned CLIP RN50x4 + the Combiner.

query  = normalize(Combiner(encode_image(ref), encode_text(T)))  (raw, un-normalised features in)
gallery = normalize(encode_image(img))  with the *same* fine-tuned image encoder
preprocessing: TargetPad(1.25) then CLIP 288 px. Text: the condition text T as is.

Weights (ABaldrati/CLIP4Cir, Google Drive folder linked from its README; code MIT):
``clip4cir/{cirr|fiq}_clip_RN50x4_fullft.pt`` = {"epoch", "CLIP": OpenAI-format state dict} and
``clip4cir/{cirr|fiq}_comb_RN50x4_fullft.pt`` = {"epoch", "Combiner": state dict}. The CIRR pair
is the default (natural images); FIQ is fashion-only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cir_bench_baselines.base import BASELINES, BadWeightsError, WeightsFile, load_state, require, \
    resolve_weights_root, strict_load
from cir_bench_baselines.clip_common import CLIPComposer, build_clip

SOURCE = "Google Drive folder linked from the README of github.com/ABaldrati/CLIP4Cir (see its issue #3)"
LICENCE = "code MIT; weights carry no licence statement: research use, do not redistribute"


class Combiner(nn.Module):
    """The authors' Combiner (src/combiner.py), same parameter names."""

    def __init__(self, clip_feature_dim: int, projection_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.text_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(0.5)
        self.dropout2 = nn.Dropout(0.5)
        self.combiner_layer = nn.Linear(projection_dim * 2, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, clip_feature_dim)
        self.dropout3 = nn.Dropout(0.5)
        self.dynamic_scalar = nn.Sequential(nn.Linear(projection_dim * 2, hidden_dim), nn.ReLU(), nn.Dropout(0.5),
                                            nn.Linear(hidden_dim, 1), nn.Sigmoid())
        self.logit_scale = 100  # a plain attribute in the authors' code, not saved

    def combine_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        text_projected = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_projected = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        raw = torch.cat((text_projected, image_projected), -1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw)))
        lam = self.dynamic_scalar(raw)
        out = self.output_layer(combined) + lam * text_features + (1 - lam) * image_features
        return F.normalize(out, dim=-1)

    @staticmethod
    def dims(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        """(clip_feature_dim, projection_dim, hidden_dim) read off a state dict."""
        proj, clip_dim = state["text_projection_layer.weight"].shape
        hidden = state["combiner_layer.weight"].shape[0]
        return int(clip_dim), int(proj), int(hidden)


class CLIP4CIR(CLIPComposer):
    name = "clip4cir"
    prompt_template = "{T}"
    target_pad = 1.25

    def __init__(self, clip: nn.Module, combiner: Combiner, image_size: int, device: str = "cpu",
                 batch_size: int = 32, variant: str = "cirr") -> None:
        super().__init__(clip, image_size, device, batch_size, modules=[combiner])
        self.combiner = combiner
        self.variant = variant

    @staticmethod
    def required_files(variant: str = "cirr") -> list[WeightsFile]:
        if variant not in ("cirr", "fiq"):
            raise ValueError(f"clip4cir variant must be cirr or fiq, got {variant!r}")
        return [WeightsFile(f"clip4cir/{variant}_clip_RN50x4_fullft.pt", SOURCE, LICENCE),
                WeightsFile(f"clip4cir/{variant}_comb_RN50x4_fullft.pt", SOURCE, LICENCE)]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, variant: str = "cirr", config_dir: str | None = None,
                     device: str = "cpu", batch_size: int = 32) -> "CLIP4CIR":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(variant)
        paths = require(cls.name, files, root, how)
        clip_file, comb_file = (paths[f.path] for f in files)
        clip_ckpt, comb_ckpt = load_state(clip_file, files[0]), load_state(comb_file, files[1])
        for ckpt, key, path in ((clip_ckpt, "CLIP", clip_file), (comb_ckpt, "Combiner", comb_file)):
            if not isinstance(ckpt, dict) or key not in ckpt:
                raise BadWeightsError(f"{path}: expected the authors' format {{'epoch', '{key}': state_dict}}, "
                                      f"found keys {list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")
        clip, cfg = build_clip(clip_ckpt["CLIP"], str(clip_file))
        combiner = Combiner(*Combiner.dims(comb_ckpt["Combiner"]))
        strict_load(combiner, comb_ckpt["Combiner"], str(comb_file))
        out = cls(clip, combiner, cfg["vision_cfg"]["image_size"], device, batch_size, variant)
        return out.finish({f.path: paths[f.path] for f in files}, cfg, "RN50x4")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": self.variant}

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        text = self.clip.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return self.combiner.combine_features(self.clip.encode_image(pixels), text)


BASELINES.register("clip4cir")(CLIP4CIR)
