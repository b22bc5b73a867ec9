"""Building the model: on the meta device (no memory), materialised, or randomly initialised."""

from __future__ import annotations

import torch
from torch import nn

from srum.model.bagel import Bagel
from srum.model.config import BagelConfig


def build_on_meta(config: BagelConfig) -> Bagel:
    """The model with every tensor on the meta device: shapes and names at no memory cost (the 7B preset too)."""
    with torch.device("meta"):
        return Bagel(config)


def reset_buffers(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute the derived buffers (RoPE frequencies, sin-cos tables), which a meta build leaves empty."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_buffers"):
            module.reset_buffers(device)


def init_weights(model: Bagel, seed: int, std: float | None = None) -> Bagel:
    """Random initialisation as Qwen2 does it (normal(0, initializer_range) for Linear and Embedding weights,
    zero biases, unit norms), reproducible from ``seed``; ``llm2vae`` stays zero so a fresh model predicts v = 0."""
    std = model.config.llm.initializer_range if std is None else std
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        if model.config.visual_gen:
            model.llm2vae.weight.zero_()
            model.llm2vae.bias.zero_()
    return model


def build_random(config: BagelConfig, seed: int, dtype: torch.dtype = torch.float32) -> Bagel:
    """A randomly initialised model on the CPU."""
    model = init_weights(Bagel(config), seed)
    return model.to(dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
