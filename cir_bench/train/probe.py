"""Linear probes: how much of each known factor a frozen feature extractor exposes."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cir_bench.data.base import Dataset
from cir_bench.data.transforms import ItemImages, build_transform
from cir_bench.models import build_backbone


@torch.no_grad()
def backbone_features(name: str, pretrained: bool, dataset: Dataset, size: int, seed: int = 0,
                      batch_size: int = 64) -> np.ndarray:
    """Pooled backbone features (eval mode) for every item; random init is seeded."""
    torch.manual_seed(seed)
    module, spec = build_backbone(name, pretrained)
    module.eval()
    loader = torch.utils.data.DataLoader(
        ItemImages(dataset, np.arange(len(dataset)), build_transform(size, spec.mean, spec.std), []),
        batch_size=batch_size)
    return torch.cat([module(x) for x, _ in loader]).numpy()


def linear_probe(x: np.ndarray, targets: dict[str, Sequence], groups: Sequence, seed: int = 0,
                 test_size: float = 0.2) -> dict[str, float]:
    """Test accuracy of a standardised logistic regression per target, split by group
    (renders of one scene never straddle the split)."""
    train, test = next(GroupShuffleSplit(1, test_size=test_size, random_state=seed).split(x, groups=groups))
    out = {}
    for name, y in targets.items():
        y = np.asarray(y)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        out[name] = round(float(clf.fit(x[train], y[train]).score(x[test], y[test])), 3)
    return out
