"""Callbacks the training tests load through the command line (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from srum.cli import main


class KillAtStep(L.Callback):
    """SIGKILL the process when a batch starts at optimizer step ``step`` (its checkpoint is already on disk):
    a crash that leaves no chance to clean up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def tiny_checkpoint(folder: Path) -> Path:
    """A random tiny checkpoint whose generation head is not zero (a fresh model predicts v = 0 everywhere)."""
    main(["model", "init", "--preset", "tiny", "--out", str(folder), "--seed", "0"])
    weights = load_file(folder / "ema.safetensors")
    shape, generator = weights["llm2vae.weight"].shape, torch.Generator().manual_seed(0)
    weights["llm2vae.weight"] = torch.randn(shape, generator=generator) * 0.1
    save_file(weights, folder / "ema.safetensors")
    return folder
