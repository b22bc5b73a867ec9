"""What a user watches besides the metrics: a PNG grid of the step's candidates with their reward maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from srum.model.autoencoder import to_uint8_images

LINE_HEIGHT = 12
"""Pixels per caption line (PIL's default font is 11 px tall)."""


def overlay(image: torch.Tensor, reward_map: torch.Tensor) -> torch.Tensor:
    """An image (H, W, 3) uint8 tinted by a reward map (rows, cols): green where the reward is high, red where
    it is low, half transparent. Returns (H, W, 3) uint8."""
    height, width = image.shape[:2]
    reward = F.interpolate(reward_map[None, None].float().cpu(), size=(height, width), mode="nearest")[0, 0]
    low, high = float(reward.min()), float(reward.max())
    level = (reward - low) / (high - low) if high > low else torch.full_like(reward, 0.5)
    tint = torch.stack([1 - level, level, torch.zeros_like(level)], dim=-1) * 255  # (H, W, 3)
    return (0.5 * image.float() + 0.5 * tint).to(torch.uint8)


def reward_grid(images: list[torch.Tensor], reward_maps: list[torch.Tensor], captions: list[str]) -> Image.Image:
    """Candidates in a row over their overlays, each with its caption (scores; lines split at newlines)
    underneath."""
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    caption_height = LINE_HEIGHT * max(caption.count("\n") + 1 for caption in captions) + 4
    grid = Image.new("RGB", (width * len(images), 2 * height + caption_height), "white")
    draw = ImageDraw.Draw(grid)
    for column, (image, reward_map, caption) in enumerate(zip(images, reward_maps, captions, strict=True)):
        grid.paste(Image.fromarray(image.numpy()), (column * width, 0))
        grid.paste(Image.fromarray(overlay(image, reward_map).numpy()), (column * width, height))
        draw.text((column * width + 2, 2 * height + 2), caption, fill="black")
    return grid


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
