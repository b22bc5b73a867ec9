"""Sampling latent images against three guidance contexts, BAGEL's way (``bagel-architecture`` §9)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from srum.generation.context import ContextBatch
from srum.generation.sampler import SamplerConfig, combine_guidance, euler_step
from srum.generation.sde import sde_step, step_noise
from srum.model.patches import unpatchify


@dataclass
class GuidanceContexts:
    """The contexts one image per row is sampled against.

    ``cond``: everything given so far. ``text_uncond``: the context as it was before the last text input
    (needed when text guidance is on). ``image_uncond``: every text input but no image (needed when image
    guidance is on).
    """

    cond: ContextBatch
    text_uncond: ContextBatch | None = None
    image_uncond: ContextBatch | None = None


@dataclass
class DenoisingStep:
    """What one Euler step saw and did (for inspection and tests); tensors are packed over the batch, (N, C)."""

    t: float
    x_t: Tensor
    v_cond: Tensor
    v_text_uncond: Tensor | None
    v_image_uncond: Tensor | None
    velocity: Tensor
    t_next: float = 0.0
    x_next: Tensor | None = None
    log_prob: Tensor | None = None
    """(N,) per-token log-probability of ``x_next`` (SDE sampling only)."""


@dataclass(frozen=True)
class StochasticSteps:
    """Run the sampler as an SDE (``srum.generation.sde``): the noise level and one generator per image for
    the step noise (continuing each image's own generator keeps images independent of their batch)."""

    noise_level: float
    generators: list[torch.Generator]


def sample_latent_tokens(contexts: GuidanceContexts, grids: list[tuple[int, int]], initial_noise: Tensor,
                         config: SamplerConfig, on_step: Callable[[DenoisingStep], None] | None = None,
                         stochastic: StochasticSteps | None = None) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) with T - 1 Euler steps (or SDE steps with ``stochastic``).

    Args:
        grids: (rows, cols) of latent tokens of each context's image.
        initial_noise: (N, latent_channels) packed image after image, row-major tokens.
    Returns:
        (N, latent_channels) the sampled latent tokens, packed like ``initial_noise``.
    """
    cond = contexts.cond
    if config.cfg_text_scale > 1.0 and contexts.text_uncond is None:
        raise ValueError("cfg_text_scale > 1 needs a text-unconditional context")
    if config.cfg_img_scale > 1.0 and config.cfg_text_scale > 1.0 and contexts.image_uncond is None:
        raise ValueError("cfg_img_scale > 1 needs an image-unconditional context")
    query = cond.denoising_query(grids)
    tokens_per_image = torch.tensor([rows * cols for rows, cols in grids])
    timesteps = config.timesteps().tolist()
    x = initial_noise.to(device=cond.device, dtype=torch.float32)
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        t_tokens = torch.full((x.shape[0],), t, device=x.device)
        v_cond = cond.velocity(query, x, t_tokens).float()
        v_text = contexts.text_uncond.velocity(query, x, t_tokens).float() if config.guided(t) else None
        v_image = contexts.image_uncond.velocity(query, x, t_tokens).float() if config.image_guided(t) else None
        velocity = combine_guidance(v_cond, v_text, v_image, config, tokens_per_image)
        log_prob = None
        if stochastic is None:
            x_next = euler_step(x, velocity, t, t_next)
        else:
            noise = step_noise(tokens_per_image.tolist(), x.shape[1], stochastic.generators).to(x.device)
            x_next, log_prob = sde_step(x, velocity, t, t_next, stochastic.noise_level, noise)
        if on_step is not None:
            on_step(DenoisingStep(t, x, v_cond, v_text, v_image, velocity, t_next, x_next, log_prob))
        x = x_next
    return x


def tokens_to_latents(tokens: Tensor, grids: list[tuple[int, int]], patch: int) -> list[Tensor]:
    """Packed latent tokens back to latent images (C, rows*patch, cols*patch), one per grid."""
    counts = [rows * cols for rows, cols in grids]
    return [unpatchify(part, rows, cols, patch) for part, (rows, cols) in zip(tokens.split(counts), grids, strict=True)]


def initial_noise(grids: list[tuple[int, int]], channels: int, generators: list[torch.Generator]) -> Tensor:
    """Each image's starting noise from its own generator, so an image never depends on its batch."""
    parts = [torch.randn(rows * cols, channels, generator=generator) for (rows, cols), generator
             in zip(grids, generators, strict=True)]
    return torch.cat(parts)
