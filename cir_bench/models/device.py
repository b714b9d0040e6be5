"""Pick the compute device once; everything else receives it."""
from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` explicitly."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(preference)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{preference}' requested but CUDA is not available")
    return dev
