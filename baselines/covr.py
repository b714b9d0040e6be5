"""CoVR (Ventura et al., AAAI 2024): BLIP-L with a cross-attending text encoder, through HF
transformers' ``BlipForImageTextRetrieval`` (the authors' BLIP code needs the network to build).

query  = normalize(text_proj(text_encoder([ENC] + tokens(T), cross-attending to ViT(ref))[:, 0]))
gallery = normalize(vision_proj(ViT(img)[:, 0]))
preprocessing: Resize((384, 384)) bicubic, no crop; CLIP mean/std. Text: the condition text T.

Weights (Hugging Face repo lucas-ventura/CoVR, MIT): ``covr/webvid-covr.ckpt`` (the zero-shot
CoVR model), a Lightning Fabric file {"epoch", "model": state dict in BLIP key names,
"optimizer", "scheduler": a pickled object of the authors' code} read weights-only with that one
class as an inert stub (no code of the file runs; any other global is refused); plus ``covr/bert-base-uncased/vocab.txt`` (Apache-2.0, from the
Hugging Face repo google-bert/bert-base-uncased) for the tokenizer. CoVR-2 (BLIP-2) is not here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from cir_bench.registry import import_extra
from cir_bench_baselines.base import BASELINES, BadWeightsError, QueryComposer, WeightsFile, load_restricted, require, \
    resolve_weights_root, strict_load
from cir_bench_baselines.clip_common import CLIP_MEAN, CLIP_STD, stack

SOURCE = "Hugging Face model repo lucas-ventura/CoVR (files tab; see tools/scripts/download_pretrained_models.sh " \
         "of github.com/lucas-ventura/CoVR)"
LICENCE = "MIT (model card); BLIP parts Salesforce BSD-3"
VOCAB_SOURCE = "Hugging Face repo google-bert/bert-base-uncased, file vocab.txt"
IGNORED = ("temp",)  # CoVR's learnt temperature: not used at inference
REAL = {"vision": {"hidden_size": 1024, "num_hidden_layers": 24, "image_size": 384, "patch_size": 16},
        "text": {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "encoder_hidden_size": 1024},
        "proj": 256}


def blip_to_hf(key: str) -> str:
    """An original BLIP key -> HF transformers' (convert_blip_original_pytorch_to_hf.py rules)."""
    if not key.startswith("visual_encoder"):
        return key
    key = re.sub(r"^visual_encoder", "vision_model.encoder", key)
    key = key.replace("blocks", "layers").replace("attn", "self_attn")
    key = key.replace("norm1", "layer_norm1").replace("norm2", "layer_norm2")
    key = key.replace("encoder.norm", "post_layernorm")
    key = key.replace("encoder.patch_embed.proj", "embeddings.patch_embedding")
    key = key.replace("encoder.pos_embed", "embeddings.position_embedding")
    key = key.replace("encoder.cls_token", "embeddings.class_embedding")
    return key.replace("self_attn.proj", "self_attn.projection")


def hf_to_blip(key: str) -> str:
    """The inverse of ``blip_to_hf`` (tests write checkpoints in the authors' key names)."""
    if not key.startswith("vision_model"):
        return key
    key = key.replace("vision_model.post_layernorm", "visual_encoder.norm")
    key = key.replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
    key = key.replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
    key = key.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
    key = key.replace("vision_model.encoder.layers", "visual_encoder.blocks")
    key = key.replace("self_attn.projection", "attn.proj").replace("self_attn", "attn")
    return key.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")


def blip_config(state: dict[str, torch.Tensor]):
    """A ``BlipConfig`` read off the tensors' shapes (heads: width / 64, as BLIP and BERT)."""
    BlipConfig = import_extra("transformers", "baselines", "the CoVR baseline").BlipConfig

    try:
        width = state["visual_encoder.cls_token"].shape[-1]
        patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
        grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
        v_layers = len({k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")})
        words = state["text_encoder.embeddings.word_embeddings.weight"]
        t_layers = len({k.split(".")[3] for k in state if k.startswith("text_encoder.encoder.layer.")})
        vision = dict(hidden_size=width, num_hidden_layers=v_layers, num_attention_heads=max(1, width // 64),
                      intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                      image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6)  # BLIP's eps, not HF's 1e-5
        text = dict(vocab_size=words.shape[0], hidden_size=words.shape[1], num_hidden_layers=t_layers,
                    num_attention_heads=max(1, words.shape[1] // 64),
                    intermediate_size=state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                    max_position_embeddings=state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
                    encoder_hidden_size=state["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1],
                    bos_token_id=words.shape[0] - 2, pad_token_id=0)  # [DEC] = vocab - 2, as BLIP adds it
        if words.shape[0] <= 102:
            text["sep_token_id"] = None  # BERT's [SEP] id is past a tiny test vocabulary
        proj = state["text_proj.weight"].shape[0]
    except KeyError as err:
        raise BadWeightsError(f"not a BLIP/CoVR state dict (no key {err})") from None
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=proj), vision, text, proj


def bert_tokenizer(vocab_file: Path):
    """BERT WordPiece over a local vocab.txt, plus BLIP's [DEC] and [ENC] (ids len(vocab), +1).

    transformers 5 silently ignores ``vocab_file=``; the vocabulary is passed as a dict and the
    result checked, so a wrong vocabulary cannot pass unnoticed."""
    BertTokenizer = import_extra("transformers", "baselines", "the CoVR baseline").BertTokenizer

    vocab: dict[str, int] = {}
    for i, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\n"), i)
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if token not in vocab:
            raise BadWeightsError(f"{vocab_file}: no {token} line; not a BERT vocabulary")
    tok = BertTokenizer(vocab=vocab)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if tok.convert_tokens_to_ids("[CLS]") != vocab["[CLS]"]:
        raise BadWeightsError(f"{vocab_file}: the tokenizer did not take this vocabulary")
    return tok


class CoVR(QueryComposer):
    name = "covr"
    prompt_template = "{T}"

    def __init__(self, model, tokenizer, image_size: int, device: str = "cpu", batch_size: int = 16,
                 checkpoint: str = "webvid-covr.ckpt") -> None:
        super().__init__(device, batch_size)
        self.model = model
        self.eval_mode(model)
        self.tokenizer = tokenizer
        self.enc_token_id = int(tokenizer.convert_tokens_to_ids("[ENC]"))
        self.image_size = image_size
        self.checkpoint = checkpoint
        self.transform = v2.Compose([lambda im: im.convert("RGB"),
                                     v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC),
                                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                                     v2.Normalize(CLIP_MEAN, CLIP_STD)])

    @staticmethod
    def required_files(checkpoint: str = "webvid-covr.ckpt", **_: Any) -> list[WeightsFile]:
        # Fabric's .ckpt pickles the authors' learning-rate schedule object (src/tools/scheduler.py)
        return [WeightsFile(f"covr/{checkpoint}", SOURCE, LICENCE,
                            pickled_classes=("src.tools.scheduler.CosineSchedule", "src.tools.scheduler.StepSchedule")),
                WeightsFile("covr/bert-base-uncased/vocab.txt", VOCAB_SOURCE, "Apache-2.0", min_bytes=16,
                            kind="text")]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, checkpoint: str = "webvid-covr.ckpt",
                     config_dir: str | None = None, device: str = "cpu", batch_size: int = 16) -> "CoVR":
        transformers = import_extra("transformers", "baselines", "the CoVR baseline")
        BlipForImageTextRetrieval = transformers.BlipForImageTextRetrieval

        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(checkpoint)
        paths = require(cls.name, files, root, how)
        ckpt_path, vocab_path = paths[files[0].path], paths[files[1].path]
        ckpt = load_restricted(ckpt_path, files[0])
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise BadWeightsError(f"{ckpt_path}: expected a Lightning Fabric checkpoint with a 'model' state dict, "
                                  f"found {list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt)}")
        state = {k: v for k, v in ckpt["model"].items()
                 if k not in IGNORED and not k.endswith(".position_ids") and isinstance(v, torch.Tensor)}
        config, vision, text, proj = blip_config(state)
        model = BlipForImageTextRetrieval(config)
        hf_state = {blip_to_hf(k): v for k, v in state.items()}
        # the ITM head is not part of a CoVR checkpoint nor of its query path: keep HF's init
        hf_state.update({k: v for k, v in model.state_dict().items() if k.startswith("itm_head.")})
        strict_load(model, hf_state, str(ckpt_path))
        out = cls(model, bert_tokenizer(vocab_path), vision["image_size"], device, batch_size, checkpoint)
        out._record(paths)
        real = (all(vision[k] == v for k, v in REAL["vision"].items()) and all(text[k] == v for k, v in
                REAL["text"].items()) and proj == REAL["proj"])
        if not real:
            out.notes.append(f"not the authors' BLIP-L (vision {vision['hidden_size']}x{vision['num_hidden_layers']} "
                             f"at {vision['image_size']} px, text {text['hidden_size']}x{text['num_hidden_layers']}, "
                             f"proj {proj}): numbers are not the baseline's")
        return out

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_proj.out_features)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": self.checkpoint, "preprocess": f"resize{self.image_size}-nocrop"}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return stack(self.transform, images)

    def _vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels).last_hidden_state  # post-LayerNorm tokens

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.vision_proj(self._vision(pixels)[:, 0, :]), dim=-1)

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = self._vision(pixels)
        text = self.tokenizer(list(prompts), padding="longest", truncation=True, max_length=64, return_tensors="pt")
        ids = text.input_ids.clone().to(self.device)
        ids[:, 0] = self.enc_token_id  # CoVR's query path: [ENC] in place of [CLS]
        out = self.model.text_encoder(input_ids=ids, attention_mask=text.attention_mask.to(self.device),
                                      encoder_hidden_states=image,
                                      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long,
                                                                        device=self.device))
        return self.model.text_proj(out.last_hidden_state[:, 0, :])


BASELINES.register("covr")(CoVR)
