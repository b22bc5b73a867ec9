"""Callbacks the training tests load through the command line (``--trainer.callbacks+=...``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process when a batch starts at optimizer step ``step`` (its checkpoint is already on disk):
    a crash that leaves no chance to clean up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
