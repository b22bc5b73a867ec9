"""What a user watches besides the metrics: a PNG grid of the step's candidates with their reward maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from srum.model.autoencoder import to_uint8_images
from srum.reward.grid import reward_grid


class RewardGridCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, save the last rollout's candidates with their reward maps and
    scores as ``<log dir>/grids/step_XXXXXXX.png`` (and to TensorBoard when that logger is used).

    Args:
        every_n_steps: how often, in optimizer steps.
        max_images: candidates per grid.
    """

    def __init__(self, every_n_steps: int = 50, max_images: int = 8) -> None:
        self.every_n_steps, self.max_images = every_n_steps, max_images

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
                           ) -> None:
        samples = getattr(pl_module, "last_samples", None)
        if samples is None or not trainer.is_global_zero or trainer.global_step % self.every_n_steps:
            return
        count = min(self.max_images, len(samples.latents))
        latents = torch.stack(samples.latents[:count]).float()
        images = list(to_uint8_images(pl_module.autoencoder.decode(latents)).cpu())
        kind = pl_module.scoring.score_kind
        captions = []
        for record in samples.records[:count]:
            g = record.global_scores.get(kind)
            regions = [r.scores.get(kind) for r in record.regions]
            captions.append(f"g={'-' if g is None else f'{g:+.2f}'} "
                            + " ".join("-" if s is None else f"{s:+.1f}" for s in regions[:4]))
        grid = reward_grid(images, samples.reward_maps[:count], captions)
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step_{trainer.global_step:07d}.png")
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            pixels = torch.from_numpy(np.asarray(grid)).permute(2, 0, 1)
            experiment.add_image("reward_grid", pixels, trainer.global_step)
