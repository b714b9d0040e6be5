"""The trivial references on one CLIP backbone that reviewers ask for (docs/baselines.md):

    clip-image    query = normalize(encode_image(ref))                       (condition ignored)
    clip-text     query = normalize(encode_text("a photo of {labels}"))      (image ignored)
    clip-sum      query = normalize(normalize(image) + normalize(text))      (Pic2Word's "mixture")
    clip-product  score = (image . g) * (text . g)                           (Text x Image: FreeDom's and
                                                                              BASIC's "product" baseline)

gallery = normalize(encode_image(img)), CLIP 224 px. Backbone ViT-L/14 by default (Pic2Word's and
SEARLE-XL's), ``backbone=ViT-B-32`` for SEARLE's; weights as for SEARLE (``clip/<backbone>.pt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cir_bench_baselines.base import BASELINES, FusedScores, WeightsFile, load_state, require, resolve_weights_root
from cir_bench_baselines.clip_common import CLIPComposer, build_clip
from cir_bench_baselines.searle import clip_file


class CLIPReference(CLIPComposer):
    name = "clip-sum"
    mode = "sum"
    prompt_template = "{T}"
    text_source = "labels"  # "a photo of {labels}", the same for every template

    def __init__(self, clip: nn.Module, image_size: int, backbone: str = "ViT-L-14", device: str = "cpu",
                 batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size)
        self.backbone = backbone

    @staticmethod
    def required_files(backbone: str = "ViT-L-14", **_: Any) -> list[WeightsFile]:
        return [clip_file(backbone)]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, backbone: str = "ViT-L-14",
                     config_dir: str | None = None, device: str = "cpu", batch_size: int = 32) -> "CLIPReference":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(backbone)
        paths = require(cls.name, files, root, how)
        path = paths[files[0].path]
        clip, cfg = build_clip(load_state(path, files[0]), str(path))
        out = cls(clip, cfg["vision_cfg"]["image_size"], backbone, device, batch_size)
        return out.finish(paths, cfg, backbone)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.mode, "backbone": self.backbone}

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if self.mode == "image":
            return self.clip.encode_image(pixels)
        text = F.normalize(self.clip.encode_text(self.tokenizer(list(prompts)).to(self.device)), dim=-1)
        if self.mode == "text":
            return text
        return F.normalize(self.clip.encode_image(pixels), dim=-1) + text


class CLIPProduct(FusedScores, CLIPReference):
    """Text x Image: the product of the image's and the text's cosine similarity to each gallery
    item (the authors of FreeDom and BASIC rank ``sim_img * sim_text``); no single query vector."""

    name = "clip-product"
    mode = "product"

    def fused_scores(self, images: Sequence[Image.Image], prompts: list[str], gallery: torch.Tensor) -> torch.Tensor:
        image, text = self.encode_gallery(images), self.encode_texts(prompts)  # both normalised
        return (image @ gallery.T) * (text @ gallery.T)


class CLIPImageOnly(CLIPReference):
    name = "clip-image"
    mode = "image"


class CLIPTextOnly(CLIPReference):
    name = "clip-text"
    mode = "text"


BASELINES.register("clip-image")(CLIPImageOnly)
BASELINES.register("clip-text")(CLIPTextOnly)
BASELINES.register("clip-sum")(CLIPReference)
BASELINES.register("clip-product")(CLIPProduct)
