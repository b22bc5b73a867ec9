"""Overfit one packed batch: the quickest end-to-end proof that every path of a model learns."""

from __future__ import annotations

from collections.abc import Callable

import torch

from srum.model.attention import Backend
from srum.model.bagel import Bagel
from srum.model.packing import PackedBatch


def overfit(model: Bagel, batch: PackedBatch, steps: int, lr: float, seed: int = 0, backend: Backend = "sdpa",
            on_step: Callable[[int, float, float], None] | None = None) -> list[float]:
    """AdamW on BAGEL's unified CE + flow-matching loss of one batch, with fixed noise so the target is fixed.

    Returns the loss of every step; ``on_step(step, ce, mse)`` sees each one as it happens.
    """
    model.train()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latent_tokens.shape, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = model(batch, noise=noise, backend=backend)
        loss = out.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, float(out.ce().detach().mean()), float(out.mse().detach().mean()))
    return losses
