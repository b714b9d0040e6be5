"""Build a model from its config and save/load it with that config (``weights_only=True``).

A checkpoint is a plain dict: ``{"format": 1, "model_config": {...}, "properties":
{name: [class names]}, "state_dict": {...}, "extra": {...}}``; only tensors, strings,
numbers, lists and dicts, so ``torch.load(weights_only=True)`` reads it without pickle code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cir_bench.config import ModelConfig
from cir_bench.paths import save_torch
from cir_bench.models.backbones import build_backbone
from cir_bench.models.model import ConditionalRetrievalModel

FORMAT = 1


def build_model(cfg: ModelConfig, num_classes: Mapping[str, int], load_pretrained: bool = True
                ) -> ConditionalRetrievalModel:
    backbone, spec = build_backbone(cfg.backbone, cfg.pretrained and load_pretrained, cfg.weights)
    return ConditionalRetrievalModel(
        backbone, spec.feat_dim, cfg.embed_dim, num_classes, cfg.head_hidden,
        cfg.encoder_dropout, cfg.head_dropout, cfg.finetune,
    )


def save_checkpoint(path: str | Path, model: ConditionalRetrievalModel, cfg: ModelConfig,
                    properties: Mapping[str, Sequence[str]], extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model_config": cfg.model_dump(),
        "properties": {k: list(v) for k, v in properties.items()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    save_torch(payload, path)  # atomic: a crashed run never leaves a half checkpoint
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ConditionalRetrievalModel, dict[str, Any]]:
    """Rebuild the model from the stored config (no pretrained weights needed) and load it."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cir-bench checkpoint (format {payload.get('format')!r})")
    cfg = ModelConfig(**payload["model_config"])
    num_classes = {k: len(v) for k, v in payload["properties"].items()}
    model = build_model(cfg, num_classes, load_pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return model, payload
