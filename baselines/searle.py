"""SEARLE / SEARLE-XL (Baldrati, Agnolucci et al., ICCV 2023): frozen OpenAI CLIP + Phi.

query  = normalize(encode_text("a photo of $ that {T}" with $ := Phi(encode_image(ref))))
gallery = normalize(encode_image(img)); preprocessing: TargetPad(1.25) then CLIP 224 px
(miccunifi/SEARLE#4: needed to reproduce the paper).

Weights: ``searle/SEARLE_ViT-B32.pt`` (SEARLE) or ``searle/SEARLE_ViT-L14.pt`` (SEARLE-XL) =
{"Phi": state dict}, assets of the GitHub release "weights" of miccunifi/SEARLE, licence
CC BY-NC 4.0 (non-commercial; never redistribute). The CLIP backbone separately:
``clip/ViT-B-32.pt`` / ``clip/ViT-L-14.pt`` (OpenAI's files) or open_clip's copy
``clip/ViT-B-32/open_clip_model.safetensors`` (hf: timm/vit_base_patch32_clip_224.openai).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from cir_bench_baselines.base import BASELINES, BadWeightsError, WeightsFile, load_state, require, \
    resolve_weights_root, strict_load
from cir_bench_baselines.clip_common import CLIPComposer, build_clip, encode_text_with_pseudo_tokens, placeholder_id

SEARLE_SOURCE = "GitHub release 'weights' of github.com/miccunifi/SEARLE"
SEARLE_LICENCE = "CC BY-NC 4.0 (code and weights): non-commercial use only, never redistribute"
CLIP_LICENCE = "MIT (OpenAI CLIP)"


def clip_file(backbone: str) -> WeightsFile:
    """OpenAI CLIP weights (``ViT-B-32`` / ``ViT-L-14``): OpenAI's .pt or open_clip's safetensors."""
    hf = {"ViT-B-32": "timm/vit_base_patch32_clip_224.openai", "ViT-L-14": "timm/vit_large_patch14_clip_224.openai"}
    return WeightsFile(f"clip/{backbone}.pt", f"OpenAI CLIP release (openaipublic.azureedge.net, the URL in "
                       f"open_clip's pretrained.py for {backbone} 'openai'), or Hugging Face {hf[backbone]} "
                       "(open_clip_model.safetensors)", CLIP_LICENCE,
                       alternatives=(f"clip/{backbone}/open_clip_model.safetensors",))


class Phi(nn.Module):
    """The authors' textual-inversion network (src/phi.py), same parameter names."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @staticmethod
    def dims(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
        return (int(state["layers.0.weight"].shape[1]), int(state["layers.0.weight"].shape[0]),
                int(state["layers.6.weight"].shape[0]))


class SEARLE(CLIPComposer):
    name = "searle"
    backbone = "ViT-B-32"
    phi_file = "searle/SEARLE_ViT-B32.pt"
    prompt_template = "a photo of $ that {T}"
    placeholder = "$"
    target_pad = 1.25

    def __init__(self, clip: nn.Module, phi: Phi, image_size: int, device: str = "cpu", batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size, modules=[phi])
        self.phi = phi
        self.placeholder_id = placeholder_id(self.tokenizer, self.placeholder)

    @classmethod
    def required_files(cls, **_: Any) -> list[WeightsFile]:
        return [WeightsFile(cls.phi_file, SEARLE_SOURCE, SEARLE_LICENCE), clip_file(cls.backbone)]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, config_dir: str | None = None, device: str = "cpu",
                     batch_size: int = 32) -> "SEARLE":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files()
        paths = require(cls.name, files, root, how)
        phi_path, clip_path = paths[files[0].path], paths[files[1].path]
        ckpt = load_state(phi_path, files[0])
        if not isinstance(ckpt, dict) or "Phi" not in ckpt:
            raise BadWeightsError(f"{phi_path}: expected the authors' format {{'Phi': state_dict}}, found keys "
                                  f"{list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")
        clip, cfg = build_clip(load_state(clip_path, files[1]), str(clip_path))
        phi = Phi(*Phi.dims(ckpt["Phi"]))
        strict_load(phi, ckpt["Phi"], str(phi_path))
        if phi.layers[0].in_features != cfg["embed_dim"] or phi.layers[6].out_features != cfg["text_cfg"]["width"]:
            raise BadWeightsError(f"{phi_path} maps {phi.layers[0].in_features}->{phi.layers[6].out_features} but "
                                  f"{clip_path} has image features {cfg['embed_dim']} and token width "
                                  f"{cfg['text_cfg']['width']}: Phi and CLIP backbone do not belong together")
        out = cls(clip, phi, cfg["vision_cfg"]["image_size"], device, batch_size)
        return out.finish(paths, cfg, cls.backbone)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backbone": self.backbone}

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pseudo = self.phi(self.clip.encode_image(pixels))  # from the un-normalised feature
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return encode_text_with_pseudo_tokens(self.clip, tokens, pseudo, self.placeholder_id)


class SEARLEXL(SEARLE):
    name = "searle-xl"
    backbone = "ViT-L-14"
    phi_file = "searle/SEARLE_ViT-L14.pt"


BASELINES.register("searle")(SEARLE)
BASELINES.register("searle-xl")(SEARLEXL)
