"""Encoder + heads training (paper Eq 1): L = sum_i w_i * CE(y_i, phi_i(encoder(x)))."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cir_bench.config import ModelConfig, TrainConfig
from cir_bench.data.base import Dataset
from cir_bench.data.transforms import ItemImages, build_transform
from cir_bench.models import BACKBONES, build_model
from cir_bench.models.model import ConditionalRetrievalModel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_input_size(model_cfg: ModelConfig, dataset: Dataset) -> int:
    """Config value, else the dataset's native size for a from-scratch net, else the backbone's."""
    spec = BACKBONES.get(model_cfg.backbone)
    if model_cfg.input_size:
        return int(model_cfg.input_size)
    if not model_cfg.pretrained and dataset.image_size:
        return int(dataset.image_size)
    return spec.input_size


def property_weights(dataset: Dataset, cfg: TrainConfig) -> dict[str, float]:
    names = [p.name for p in dataset.properties]
    unknown = set(cfg.property_weights) - set(names)
    if unknown:
        raise ValueError(f"train.property_weights names unknown properties {sorted(unknown)}; valid: {names}")
    return {n: float(cfg.property_weights.get(n, 1.0)) for n in names}


def split_train_val(dataset: Dataset, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train = dataset.split_indices("train")
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(train)
    n_val = int(round(val_fraction * len(train)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class TrainHistory:
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}


@torch.no_grad()
def _feature_loader(model: ConditionalRetrievalModel, loader: torch.utils.data.DataLoader, device: torch.device,
                    batch_size: int, shuffle: bool, gen: torch.Generator | None, drop_last: bool
                    ) -> torch.utils.data.DataLoader:
    feats, labels = [], []
    for x, y in loader:
        feats.append(model.backbone(x.to(device)).float())
        labels.append(y.to(device))
    data = torch.utils.data.TensorDataset(torch.cat(feats), torch.cat(labels))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       drop_last=drop_last)


@torch.no_grad()
def evaluate_accuracy(model: ConditionalRetrievalModel, loader: torch.utils.data.DataLoader,
                      names: list[str], device: torch.device, embed_fn=None) -> dict[str, float]:
    model.eval()
    embed_fn = embed_fn or model.embed
    correct = np.zeros(len(names))
    total = 0
    for x, y in loader:
        logits = model.classify(embed_fn(x.to(device)))
        y = y.to(device)
        for j, n in enumerate(names):
            correct[j] += (logits[n].argmax(1) == y[:, j]).sum().item()
        total += len(y)
    return {n: float(correct[j] / max(total, 1)) for j, n in enumerate(names)}


def train_model(dataset: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device,
                seed: int, progress: bool = True) -> tuple[ConditionalRetrievalModel, TrainHistory]:
    """Train encoder + heads on the train split; report per-property train and val accuracy."""
    seed_everything(seed)
    names = [p.name for p in dataset.properties]
    weights = property_weights(dataset, train_cfg)
    spec = BACKBONES.get(model_cfg.backbone)
    size = resolve_input_size(model_cfg, dataset)
    model = build_model(model_cfg, {p.name: p.num_classes for p in dataset.properties}).to(device)

    train_idx, val_idx = split_train_val(dataset, train_cfg.val_fraction, seed)
    t_train = build_transform(size, spec.mean, spec.std, train=True, augment=train_cfg.augment,
                              square=dataset.square_resize)
    t_eval = build_transform(size, spec.mean, spec.std, square=dataset.square_resize)
    gen = torch.Generator().manual_seed(seed)
    drop_last = len(train_idx) % train_cfg.batch_size == 1  # a batch of 1 breaks BatchNorm
    train_loader = torch.utils.data.DataLoader(
        ItemImages(dataset, train_idx, t_train, names), batch_size=train_cfg.batch_size, shuffle=True,
        generator=gen, num_workers=train_cfg.num_workers, drop_last=drop_last,
    )
    val_loader = torch.utils.data.DataLoader(
        ItemImages(dataset, val_idx, t_eval, names), batch_size=256, num_workers=train_cfg.num_workers
    ) if len(val_idx) else None

    embed_fn = model.embed
    if not model_cfg.finetune and (not train_cfg.augment or dataset.square_resize):
        # A frozen backbone without augmentation sees the same image every epoch: compute
        # its features once and train the reduction and heads on them.
        model.eval()
        train_loader = _feature_loader(model, train_loader, device, train_cfg.batch_size, True, gen, drop_last)
        val_loader = _feature_loader(model, val_loader, device, 256, False, None, False) if val_loader else None
        embed_fn = model.reduction
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=train_cfg.lr_step, gamma=train_cfg.lr_gamma)
    ce = nn.CrossEntropyLoss()
    history = TrainHistory()
    bar = tqdm(range(train_cfg.epochs), desc=f"train {model_cfg.backbone}", disable=not progress,
               unit="epoch", leave=True)
    for epoch in bar:
        model.train()
        correct = np.zeros(len(names))
        seen, loss_sum = 0, 0.0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            logits = model.classify(embed_fn(x))
            loss = sum(weights[n] * ce(logits[n], y[:, j]) for j, n in enumerate(names))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            for j, n in enumerate(names):
                correct[j] += (logits[n].argmax(1) == y[:, j]).sum().item()
        sched.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
        row.update({f"train_acc_{n}": float(correct[j] / max(seen, 1)) for j, n in enumerate(names)})
        if val_loader is not None:
            row.update({f"val_acc_{n}": v for n, v in evaluate_accuracy(model, val_loader, names, device,
                                                                        embed_fn).items()})
        history.epochs.append(row)
        bar.set_postfix({k.replace("_acc_", ":"): f"{v:.2f}" for k, v in row.items() if "acc" in k or k == "loss"})
    model.eval()
    return model, history
