"""Where and in which precision the inference commands run."""

from __future__ import annotations

from typing import Literal

import torch

DtypeChoice = Literal["auto", "float32", "bfloat16"]


def device_and_dtype(device: str | None, dtype: DtypeChoice) -> tuple[str, torch.dtype]:
    """The device (default: cuda when available) and weights dtype (auto: bfloat16 on GPU, float32 on CPU)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, getattr(torch, dtype)
