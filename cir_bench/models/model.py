"""Encoder (backbone -> FC reduction -> z) plus one classifier head phi per property.

Paper §Methodology and the authors' code: z = tanh(BN(FC(Dropout(BN(ReLU(FC(h)))))))
and each head is three FC layers with BN and dropout on the hidden layers.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """phi_a: three FC layers (hidden layers with ReLU, BN and dropout)."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: Sequence[int] = (256, 128),
                 dropout: float = 0.4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = embed_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.BatchNorm1d(h), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConditionalRetrievalModel(nn.Module):
    """backbone -> reduction -> z; ``heads[name](z)`` gives the logits of each property."""

    def __init__(self, backbone: nn.Module, feat_dim: int, embed_dim: int, num_classes: Mapping[str, int],
                 head_hidden: Sequence[int] = (256, 128), encoder_dropout: float = 0.1,
                 head_dropout: float = 0.4, finetune: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.finetune = finetune
        self.reduction = nn.Sequential(
            nn.Linear(feat_dim, embed_dim),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(embed_dim),
            nn.Dropout(encoder_dropout),
            nn.Linear(embed_dim, embed_dim),
            nn.BatchNorm1d(embed_dim),
            nn.Tanh(),
        )
        self.heads = nn.ModuleDict(
            {name: ClassifierHead(embed_dim, n, head_hidden, head_dropout) for name, n in num_classes.items()}
        )
        self.embed_dim = embed_dim
        if not finetune:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ConditionalRetrievalModel":
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()  # frozen backbone: BN running stats stay as loaded
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.finetune:
            h = self.backbone(x)
        else:
            with torch.no_grad():
                h = self.backbone(x)
        return self.reduction(h)

    def classify(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(z) for name, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.embed(x)
        return z, self.classify(z)
