"""Image preprocessing: PIL image -> normalised tensor, and a torch Dataset over items."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from cir_bench.data.base import Dataset


def build_transform(input_size: int, mean: Sequence[float], std: Sequence[float], train: bool = False,
                    augment: bool = False, square: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """The paper's preprocessing. Eval: resize the shorter side, centre crop. Train with
    ``augment``: resize the shorter side, random crop, random horizontal and vertical flips
    (off by default: SynthArt's context factors include position). ``square`` (aPY crops):
    resize to input_size x input_size, no crop and no augmentation, as the authors do."""
    steps: list = [v2.PILToTensor()]
    if square:
        steps += [v2.Resize((input_size, input_size), antialias=True)]
    elif train and augment:
        steps += [v2.Resize(input_size, antialias=True), v2.RandomCrop(input_size),
                  v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    else:
        steps += [v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def describe_transform(input_size: int, mean: Sequence[float], std: Sequence[float], square: bool = False) -> dict:
    """What identifies the eval preprocessing (part of the embedding cache key)."""
    return {"input_size": input_size, "mean": list(mean), "std": list(std),
            "eval": "square-resize" if square else "resize+centercrop"}


class ItemImages(torch.utils.data.Dataset):
    """(image tensor, label vector) for the given item positions of a dataset."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, transform: Callable,
                 properties: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices)
        self.transform = transform
        props = properties if properties is not None else [p.name for p in dataset.properties]
        self.labels = np.stack([dataset.labels(p) for p in props], axis=1) if props else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = int(self.indices[i])
        x = self.transform(self.dataset.load_image(idx))
        y = torch.as_tensor(self.labels[idx]) if self.labels is not None else torch.zeros(0)
        return x, y
