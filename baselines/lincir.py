"""LinCIR (Gu, Chun et al., CVPR 2024; navervision/lincir, CC BY-NC 4.0, read at 1dec42d): a
textual-inversion network trained with language only, on the HF transformers CLIP it was
trained with (``openai/clip-vit-large-patch14``), as its validate.py evaluates it:

    pseudo  = Phi(image_embeds(ref))                                   (no normalisation first)
    query   = normalize(text_embeds("a photo of $ that {T}" with every $ -> pseudo))
    gallery = normalize(image_embeds(img))

Preprocessing: CLIPImageProcessor (shortest edge 224, bicubic, centre crop 224, CLIP mean/std),
float32. Text: OpenAI CLIP's BPE tokenizer at 77 tokens (the authors' ``clip.tokenize``; the
same vocabulary ships in open_clip's wheel, so no tokenizer file is needed).

Files (never downloaded): ``lincir/lincir_large.pt`` = {"Phi": state dict} (Hugging Face repo
navervision/zeroshot-cir-models, CC BY-NC 4.0) and the HF CLIP folder
``lincir/clip-vit-large-patch14/`` (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin`` of the Hugging Face repo openai/clip-vit-large-patch14, MIT).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from PIL import Image

from cir_bench.registry import import_extra
from cir_bench_baselines.base import BASELINES, BadWeightsError, QueryComposer, WeightsFile, load_state, require, \
    resolve_weights_root, strict_load
from cir_bench_baselines.clip_common import placeholder_id, tokenizer
from cir_bench_baselines.searle import Phi

LINCIR_SOURCE = "Hugging Face repo navervision/zeroshot-cir-models, file lincir_large.pt"
LINCIR_LICENCE = "CC BY-NC 4.0 (NAVER): non-commercial use only, never redistribute"
CLIP_SOURCE = "Hugging Face repo openai/clip-vit-large-patch14"
CLIP_FOLDER = "lincir/clip-vit-large-patch14"
REAL = {"projection_dim": 768, "text_hidden": 768, "vision_hidden": 1024, "vision_layers": 24}


class LinCIR(QueryComposer):
    name = "lincir"
    prompt_template = "a photo of $ that {T}"
    placeholder = "$"

    def __init__(self, clip: nn.Module, phi: Phi, device: str = "cpu", batch_size: int = 32) -> None:
        super().__init__(device, batch_size)
        self.clip, self.phi = clip, phi  # a transformers CLIPModel
        self.eval_mode(clip, phi)
        processor = import_extra("transformers", "baselines", "the LinCIR baseline").CLIPImageProcessor
        self.processor = processor(crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True,
                                   do_normalize=True, do_rescale=True, do_resize=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3,
                                   size={"shortest_edge": 224})
        self.tokenizer = tokenizer()
        self.placeholder_id = placeholder_id(self.tokenizer, self.placeholder)
        self.token_embedding = self.clip.text_model.embeddings.token_embedding

    @staticmethod
    def required_files(**_: Any) -> list[WeightsFile]:
        return [WeightsFile("lincir/lincir_large.pt", LINCIR_SOURCE, LINCIR_LICENCE),
                WeightsFile(f"{CLIP_FOLDER}/config.json", f"{CLIP_SOURCE}, file config.json", "MIT", min_bytes=64,
                            kind="text"),
                WeightsFile(f"{CLIP_FOLDER}/model.safetensors", f"{CLIP_SOURCE}, file model.safetensors "
                            "(or pytorch_model.bin)", "MIT", alternatives=(f"{CLIP_FOLDER}/pytorch_model.bin",))]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, config_dir: str | None = None, device: str = "cpu",
                     batch_size: int = 32) -> "LinCIR":
        transformers = import_extra("transformers", "baselines", "the LinCIR baseline")
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files()
        paths = require(cls.name, files, root, how)
        for f in files:
            f.check(paths[f.path])
        folder = paths[files[1].path].parent
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # compare's output, not a loading bar per adapter
        try:  # the whole CLIPModel: its vision and text towers with projections, as the authors load them
            clip = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise BadWeightsError(f"{folder}: not a Hugging Face CLIP model folder ({err}); get "
                                  f"config.json and model.safetensors of {CLIP_SOURCE} again") from None
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        phi_path = paths[files[0].path]
        ckpt = load_state(phi_path, files[0])
        if not isinstance(ckpt, dict) or "Phi" not in ckpt:
            raise BadWeightsError(f"{phi_path}: expected the authors' format {{'Phi': state_dict}}, found keys "
                                  f"{list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")
        phi = Phi(*Phi.dims(ckpt["Phi"]))
        strict_load(phi, ckpt["Phi"], str(phi_path))
        projection, width = clip.config.projection_dim, clip.config.text_config.hidden_size
        if phi.layers[0].in_features != projection or phi.layers[6].out_features != width:
            raise BadWeightsError(f"{phi_path} maps {phi.layers[0].in_features}->{phi.layers[6].out_features} but "
                                  f"{folder} has image embeddings of {projection} and token width {width}: Phi and "
                                  "CLIP backbone do not belong together")
        out = cls(clip, phi, device, batch_size)
        out._record(paths)
        real = {"projection_dim": projection, "text_hidden": width, "vision_hidden": clip.config.vision_config.hidden_size,
                "vision_layers": clip.config.vision_config.num_hidden_layers}
        if real != REAL:
            out.notes.append(f"not the authors' CLIP ViT-L/14 ({real}): numbers are not the baseline's")
        return out

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "preprocess": "hf-clip-image-processor-224", "backbone": "hf-clip-vit-large-patch14"}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(list(images), return_tensors="pt")["pixel_values"]

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIPVisionModelWithProjection's image_embeds."""
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).pooler_output)

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pseudo = self.phi(self._encode_images(pixels))
        ids = self.tokenizer(list(prompts)).to(self.device)
        if not bool((ids == self.placeholder_id).any(dim=1).all()):
            raise ValueError("a LinCIR prompt holds no '$' placeholder")
        return self.encode_text_with_pseudo_tokens(ids, pseudo)

    def encode_text_with_pseudo_tokens(self, ids: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """HF CLIP's ``text_embeds`` with every placeholder's token embedding replaced by its row's
        pseudo-word (the authors' encode_with_pseudo_tokens_HF), through the model's own forward."""
        where = (ids == self.placeholder_id)[..., None]

        def swap(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return torch.where(where, pseudo[:, None, :].to(output.dtype), output)

        handle = self.token_embedding.register_forward_hook(swap)
        try:  # CLIPTextModelWithProjection's text_embeds
            return self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)
        finally:
            handle.remove()


BASELINES.register("lincir")(LinCIR)
