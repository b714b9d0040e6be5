"""Knowledge distillation of Backward Search into the student (paper Fig 4).

Inputs are train-split embeddings; every epoch each one gets a freshly sampled condition
per property (uniform over all classes, as the authors do) and the batched Backward
Search teacher computes its target z*. Loss: MSE(student(z0, c), z*).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cir_bench.models.student import Student, StudentConfig

#: (z0 (B, d), conditions (B, M) class ids) -> the teacher's z* (B, d). The pipeline passes
#: Backward Search bound to the trained heads; training does not depend on the search stage.
Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distill_student(teacher: Teacher, z_train: torch.Tensor, properties: Sequence[str],
                    num_classes: Sequence[int], cfg: StudentConfig, seed: int,
                    device: torch.device, progress: bool = False) -> tuple[Student, list[dict]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 23])
    student = Student(z_train.shape[1], num_classes, properties, cfg).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    z_train = z_train.to(device).float()
    n = z_train.shape[0]
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="distil student", disable=not progress, unit="epoch"):
        cond = torch.as_tensor(np.stack([rng.integers(c, size=n) for c in num_classes], axis=1), device=device)
        target = teacher(z_train, cond).detach()
        perm = torch.as_tensor(rng.permutation(n), device=device)
        student.train()
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            if idx.numel() < 2:  # BatchNorm needs two rows
                continue
            loss = torch.nn.functional.mse_loss(student(z_train[idx], cond[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        history.append({"epoch": epoch + 1, "mse": total / n})
    return student.eval(), history
