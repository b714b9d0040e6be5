"""Named query tasks reproducing the paper's Table 1, and the paper's training recipe.

``cir-bench run --task cub-bird --root /data/CUB`` = dataset + query set of that row:
1000 test queries, class-balanced, condition != own class, >= 10 relevant items.
``--paper-recipe`` adds the paper's model and training settings (Implementations section):
ImageNet ConvNeXt-base, frozen backbone, d = 256, 100 epochs, Adam with weight decay 1e-4,
StepLR(30, 0.1), 224 px, random crop + flips.
"""
from __future__ import annotations

TASKS: dict[str, list[str]] = {
    "cub-bird": ["dataset.name=cub", "queries.sets=[[bird]]"],
    "apy-category": ["dataset.name=apy", "queries.sets=[[category]]"],
    "wikiart-style": ["dataset.name=wikiart", "queries.sets=[[style]]"],
    "wikiart-multi": ["dataset.name=wikiart", "queries.sets=[[style, genre]]"],
}
TASK_COMMON = ["dataset.options={}", "queries.n_queries=1000", "queries.min_relevant=10",
               "queries.query_split=test", "queries.database_split=test"]

PAPER_RECIPE = [
    "model.backbone=convnext_base", "model.pretrained=true", "model.finetune=false", "model.embed_dim=256",
    "model.input_size=224", "model.head_dropout=0.4", "train.epochs=100", "train.lr=1e-3",
    "train.weight_decay=1e-4", "train.lr_step=30", "train.lr_gamma=0.1", "train.augment=true",
]


def task_overrides(name: str) -> list[str]:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name][:1] + TASK_COMMON + TASKS[name][1:]
