"""Pic2Word (Saito et al., CVPR 2023): frozen CLIP ViT-L/14 + IM2TEXT pseudo-word.

query  = normalize(encode_text("a photo of * , {T}" with * := IM2TEXT(encode_image(ref))))
gallery = normalize(encode_image(img)); preprocessing: CLIP 224 px (no TargetPad, as the repo).
The placeholder is located per row (the authors' code takes row 0's position for the batch).

Weights (google-research/composed_image_retrieval, Google Drive link in its README; code
Apache-2.0): ``pic2word/pic2word_model.pt`` = {"epoch", "state_dict": CLIP (keys may carry
``module.``), "state_dict_img2text": IM2TEXT, "optimizer"}; it holds the whole CLIP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from cir_bench_baselines.base import BASELINES, BadWeightsError, WeightsFile, load_state, require, \
    resolve_weights_root, strict_load
from cir_bench_baselines.clip_common import CLIPComposer, build_clip, encode_text_with_pseudo_tokens, placeholder_id, \
    strip_prefix

SOURCE = "Google Drive link in the README of github.com/google-research/composed_image_retrieval"
LICENCE = "code Apache-2.0; weights carry no licence statement: research use, do not redistribute"


class IM2TEXT(nn.Module):
    """The authors' mapping network (model/model.py), same parameter names."""

    def __init__(self, embed_dim: int = 768, middle_dim: int = 512, output_dim: int = 768, n_layer: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fc_out = nn.Linear(middle_dim, output_dim)
        layers, dim = [], embed_dim
        for _ in range(n_layer):
            layers.append(nn.Sequential(nn.Linear(dim, middle_dim), nn.Dropout(dropout), nn.ReLU()))
            dim = middle_dim
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc_out(x)

    @staticmethod
    def dims(state: dict[str, torch.Tensor]) -> dict[str, int]:
        n = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        return {"embed_dim": int(state["layers.0.0.weight"].shape[1]), "middle_dim": int(state["fc_out.weight"].shape[1]),
                "output_dim": int(state["fc_out.weight"].shape[0]), "n_layer": n}


class Pic2Word(CLIPComposer):
    name = "pic2word"
    prompt_template = "a photo of * , {T}"
    placeholder = "*"

    def __init__(self, clip: nn.Module, img2text: IM2TEXT, image_size: int, device: str = "cpu",
                 batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size, modules=[img2text])
        self.img2text = img2text
        self.placeholder_id = placeholder_id(self.tokenizer, self.placeholder)

    @staticmethod
    def required_files(**_: Any) -> list[WeightsFile]:
        return [WeightsFile("pic2word/pic2word_model.pt", SOURCE, LICENCE)]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, config_dir: str | None = None, device: str = "cpu",
                     batch_size: int = 32) -> "Pic2Word":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files()
        paths = require(cls.name, files, root, how)
        path = paths[files[0].path]
        ckpt = load_state(path, files[0])
        if not isinstance(ckpt, dict) or not {"state_dict", "state_dict_img2text"} <= set(ckpt):
            raise BadWeightsError(f"{path}: expected the authors' format {{'epoch', 'state_dict', "
                                  f"'state_dict_img2text', 'optimizer'}}, found keys "
                                  f"{list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")
        clip, cfg = build_clip(ckpt["state_dict"], f"{path} ['state_dict']")
        mapping_state = strip_prefix(ckpt["state_dict_img2text"])
        img2text = IM2TEXT(**IM2TEXT.dims(mapping_state))
        strict_load(img2text, mapping_state, f"{path} ['state_dict_img2text']")
        out = cls(clip, img2text, cfg["vision_cfg"]["image_size"], device, batch_size)
        return out.finish(paths, cfg, "ViT-L-14")

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pseudo = self.img2text(self.clip.encode_image(pixels))  # from the un-normalised feature
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return encode_text_with_pseudo_tokens(self.clip, tokens, pseudo, self.placeholder_id)


BASELINES.register("pic2word")(Pic2Word)
