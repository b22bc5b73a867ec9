"""The flow-matching Euler sampler and classifier-free guidance, as BAGEL's ``generate_image`` runs them.

The sampler never sees the model: ``timesteps`` gives the schedule and ``step`` one Euler update; the rollout
(``srum.generation.image``) owns the model calls and the guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from srum.model.flow import shift_timesteps

RenormType = Literal["global", "channel", "text_channel"]


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler and guidance settings (defaults: BAGEL's text-to-image recipe)."""

    num_timesteps: int = 50
    """Grid points of ``linspace(1, 0, T)``; T - 1 model evaluations."""
    timestep_shift: float = 3.0
    """``t <- s t / (1 + (s - 1) t)`` on the grid."""
    cfg_text_scale: float = 4.0
    """Text guidance scale; 1 disables text (and image) guidance."""
    cfg_img_scale: float = 1.0
    """Image guidance scale; 1 disables it."""
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    """Guidance only where ``interval[0] < t <= interval[1]`` (on the shifted t)."""
    cfg_renorm_type: RenormType = "global"
    """``global`` (norm over an image), ``channel`` (per token), ``text_channel`` (per token, text guidance only)."""
    cfg_renorm_min: float = 0.0
    """Lower bound of the renorm scale; 1 disables renormalisation."""

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps: expected at least 2, got {self.num_timesteps}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift: expected a positive number, got {self.timestep_shift}")
        if self.cfg_renorm_type not in ("global", "channel", "text_channel"):
            raise ValueError(f"cfg_renorm_type: expected global, channel or text_channel, got {self.cfg_renorm_type!r}")
        object.__setattr__(self, "cfg_interval", tuple(self.cfg_interval))
        low, high = self.cfg_interval
        if not 0 <= low < high:  # a reversed interval would switch guidance off without a word
            raise ValueError(f"cfg_interval: expected [low, high] with 0 <= low < high, got {list(self.cfg_interval)}")

    def timesteps(self) -> Tensor:
        """The shifted grid (T,), from 1 down to 0; step k integrates from ``t[k]`` to ``t[k + 1]``."""
        return shift_timesteps(torch.linspace(1, 0, self.num_timesteps), self.timestep_shift)

    def guided(self, t: float) -> bool:
        """Whether text guidance runs at time t (image guidance needs text guidance too)."""
        low, high = self.cfg_interval
        return self.cfg_text_scale > 1.0 and low < t <= high

    def image_guided(self, t: float) -> bool:
        return self.guided(t) and self.cfg_img_scale > 1.0


def euler_step(x: Tensor, velocity: Tensor, t: float, t_next: float) -> Tensor:
    """``x <- x - v (t - t_next)``: velocities point from data to noise and the sampler walks back to t = 0."""
    return x - velocity.to(x.dtype) * (t - t_next)


def _norms(x: Tensor, per_token: bool, image_ids: Tensor, num_images: int) -> Tensor:
    """Per-token (N, 1) norms: over each token's channels, or over all tokens and channels of its image."""
    if per_token:
        return x.norm(dim=-1, keepdim=True)
    squares = x.new_zeros(num_images).index_add_(0, image_ids, x.pow(2).sum(-1))
    return squares.sqrt()[image_ids][:, None]


def _renorm(reference: Tensor, guided: Tensor, minimum: float, per_token: bool, image_ids: Tensor,
            num_images: int) -> Tensor:
    """Shrink ``guided`` so its norm does not exceed ``reference``'s (the scale is clamped to [minimum, 1])."""
    scale = _norms(reference, per_token, image_ids, num_images) / (
        _norms(guided, per_token, image_ids, num_images) + 1e-8)
    return guided * scale.clamp(min=minimum, max=1.0)


def combine_guidance(v_cond: Tensor, v_text_uncond: Tensor | None, v_image_uncond: Tensor | None,
                     config: SamplerConfig, tokens_per_image: Tensor | None = None) -> Tensor:
    """BAGEL's CFG combination and renormalisation over the packed latent tokens of several images, (N, C).

    ``v_text_uncond`` None means no guidance at this step (``v_cond`` is returned); ``v_image_uncond`` None means
    no image guidance. ``tokens_per_image`` (B,) splits the tokens into images (default: one image). The official
    code takes the ``global`` norm over every image of a packed batch at once; srum takes it per image, so an
    image does not depend on what else is in its batch (identical for one image).
    """
    if v_text_uncond is None:
        return v_cond
    counts = tokens_per_image if tokens_per_image is not None else torch.tensor([v_cond.shape[0]])
    image_ids = torch.repeat_interleave(torch.arange(len(counts), device=v_cond.device), counts.to(v_cond.device))
    renorm = dict(minimum=config.cfg_renorm_min, image_ids=image_ids, num_images=len(counts))
    text_guided = v_text_uncond + config.cfg_text_scale * (v_cond - v_text_uncond)
    if config.cfg_renorm_type == "text_channel":
        text_guided = _renorm(v_cond, text_guided, per_token=True, **renorm)
        if v_image_uncond is None:
            return text_guided
        return v_image_uncond + config.cfg_img_scale * (text_guided - v_image_uncond)
    guided = text_guided
    if v_image_uncond is not None:
        guided = v_image_uncond + config.cfg_img_scale * (text_guided - v_image_uncond)
    return _renorm(v_cond, guided, per_token=config.cfg_renorm_type == "channel", **renorm)
