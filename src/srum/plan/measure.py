"""Peak tensor memory of a few real training steps on the CPU, where torch keeps no allocator statistics: the
plan's check. Every storage an operator creates or touches is counted from then on until it is freed (a weak
reference's finalizer); the largest total is the peak. The garbage collector is off meanwhile, so the peak does
not depend on when it happens to run: a tensor that only the collector would free (one held in a reference
cycle) counts as held, as it would stay on a GPU until then."""

from __future__ import annotations

import gc
import tempfile
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as tracker: ...`` then ``tracker.peak`` bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage in self.live:
            return
        nbytes = storage.nbytes()
        self.live[storage] = nbytes
        weakref.finalize(storage, self._freed, nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, out))[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out


def fit_steps(fit_args: list[str], steps: int) -> None:
    """``srum fit`` over ``fit_args`` for ``steps`` optimizer steps, without the configured callbacks, logger and
    checkpoints (the plan sizes the training step, not its reports)."""
    from srum.train.cli import run_lightning

    with tempfile.TemporaryDirectory() as folder:
        run_lightning(["fit", *fit_args, "--trainer.max_steps", str(steps), "--trainer.callbacks", "[]",
                       "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                       "--trainer.default_root_dir", folder])


def measured_peak(fit_args: list[str], steps: int) -> int:
    """Peak bytes of :func:`fit_steps` on the CPU."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with PeakMemory() as tracker:
            fit_steps(fit_args, steps)
    finally:
        if collecting:
            gc.enable()
    return tracker.peak
