"""Pictures of rewards: images tinted by their reward maps, in a captioned grid (what training and reports show
a reader)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

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
