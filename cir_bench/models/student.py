"""The distilled student (paper §"Backward search knowledge distillation"): one forward pass
of an encoder-decoder MLP maps [z0 || one-hot(c_1) || ... || one-hot(c_M)] to the teacher's z*.

Deviation, named: by default the decoder predicts the *displacement* z* - z0 and adds z0
back (``residual=True``); the paper's and the authors' student predict z* directly
(``residual=False`` restores that). The displacement is small where the condition already
holds, which a residual learns far more easily from a few thousand embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cir_bench.config import StudentConfig
from cir_bench.paths import save_torch


def _mlp(widths: Sequence[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return layers


def _authors_layers(width_in: int, embed_dim: int, hidden: int = 128) -> tuple[nn.Module, nn.Module]:
    """The authors' student: Linear -> sigmoid -> BN twice, then Linear -> tanh; no dropout."""
    encoder = nn.Sequential(nn.Linear(width_in, hidden), nn.Sigmoid(), nn.BatchNorm1d(hidden),
                            nn.Linear(hidden, hidden), nn.Sigmoid(), nn.BatchNorm1d(hidden))
    return encoder, nn.Sequential(nn.Linear(hidden, embed_dim), nn.Tanh())


class Student(nn.Module):
    """cir-bench's student (``architecture="cir-bench"``): an encoder-decoder MLP, three layers
    each side, BN, ReLU and dropout on every hidden layer, predicting z* - z0 (``residual``).
    ``architecture="authors"``: the authors' network (docs/deviations.md, D13)."""

    def __init__(self, embed_dim: int, num_classes: Sequence[int], properties: Sequence[str],
                 cfg: StudentConfig = StudentConfig()) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = list(num_classes)
        self.properties = list(properties)
        self.cfg = cfg
        if cfg.architecture == "authors":
            self.encoder, self.decoder = _authors_layers(embed_dim + sum(num_classes), embed_dim)
            return
        widths_in = [embed_dim + sum(num_classes), *cfg.hidden, cfg.bottleneck]
        widths_out = [cfg.bottleneck, *reversed(cfg.hidden), embed_dim]
        self.encoder = nn.Sequential(*_mlp(widths_in, cfg.dropout), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(*_mlp(widths_out, cfg.dropout))

    def inputs(self, z0: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        hots = [nn.functional.one_hot(conditions[:, m], n).float() for m, n in enumerate(self.num_classes)]
        return torch.cat([z0.float(), *hots], dim=1)

    def forward(self, z0: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(self.inputs(z0, conditions)))
        return z0.float() + out if self.cfg.residual else out

    # -- persistence (weights_only) -----------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        payload = {"format": 1, "kind": "student", "embed_dim": self.embed_dim, "num_classes": self.num_classes,
                   "properties": self.properties, "config": self.cfg.model_dump(),
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}, "extra": extra or {}}
        save_torch(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Student":
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        if payload.get("kind") != "student":
            raise ValueError(f"{path}: not a cir-bench student checkpoint")
        cfg = payload["config"]
        model = cls(payload["embed_dim"], payload["num_classes"], payload["properties"],
                    StudentConfig(**{**cfg, "hidden": list(cfg["hidden"])}))
        model.load_state_dict(payload["state_dict"])
        return model.to(device).eval()
