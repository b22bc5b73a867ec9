"""The flow sampler run as an SDE, so each denoising step is a Gaussian with a log-probability (Flow-GRPO).

The ODE step ``x <- x - v (t - t_next)`` has no density. Adding noise with a matched drift keeps the marginals of
the flow (x_t = (1 - t) x0 + t eps, v = eps - x0) and makes ``x_next | x_t`` Gaussian:

    sigma_t = a sqrt(t / (1 - t))                        (a: the noise level; at the grid's first point t = 1 the
                                                          denominator is taken at the next point, as t = 1 has no
                                                          finite sigma)
    mean    = x_t + dt [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)]      with dt = t_next - t < 0
    std     = sigma_t sqrt(-dt)

so a policy-gradient step can compare how likely the current weights make the step the rollout took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FIRST_POINT_TOLERANCE = 1e-3
"""A step from within this of t = 1 starts at the grid's first point (a shifted float32 grid may round it below 1)."""


def step_sigma(t: float, t_next: float, noise_level: float) -> float:
    """sigma_t of the step from t to t_next (the first point, t = 1, uses t_next in the denominator)."""
    denominator = 1.0 - (t_next if 1.0 - t < FIRST_POINT_TOLERANCE else t)
    return noise_level * math.sqrt(t / denominator)


def sde_step_mean(x: Tensor, velocity: Tensor, t: float, t_next: float, noise_level: float) -> tuple[Tensor, float]:
    """The Gaussian of ``x_next | x``: its mean (like x, differentiable in ``velocity``) and its std (a number)."""
    sigma = step_sigma(t, t_next, noise_level)
    dt = t_next - t
    velocity = velocity.to(x.dtype)
    mean = x + dt * (velocity + sigma**2 / (2 * t) * (x + (1 - t) * velocity))
    return mean, sigma * math.sqrt(-dt)


def token_log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """Gaussian log-density of each token (row) of ``x_next`` per channel, averaged over its channels: (N,). The
    mean rather than the sum (as Flow-GRPO averages over dimensions) keeps likelihood ratios in a usable range
    whatever the latent width; the ratio's direction is the same."""
    squares = ((x_next.to(mean.dtype) - mean) ** 2).mean(-1)
    return -squares / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)


def sde_step(x: Tensor, velocity: Tensor, t: float, t_next: float, noise_level: float,
             noise: Tensor) -> tuple[Tensor, Tensor]:
    """One stochastic step with the given standard-normal ``noise``: (x_next, per-token log-probability)."""
    mean, std = sde_step_mean(x, velocity, t, t_next, noise_level)
    x_next = mean + std * noise.to(mean.dtype)
    return x_next, token_log_prob(x_next, mean, std)


def step_noise(counts: list[int], channels: int, generators: list[torch.Generator]) -> Tensor:
    """Standard-normal step noise, each image's rows from its own generator (batch-independent)."""
    return torch.cat([torch.randn(count, channels, generator=generator)
                      for count, generator in zip(counts, generators, strict=True)])


@dataclass
class Trajectory:
    """The steps an SDE rollout took, packed over its images like the latent tokens: ``states[s]`` is x at
    ``times[s][0]``, ``next_states[s]`` the x it stepped to at ``times[s][1]``, ``log_probs[s]`` (N,) the
    per-token log-probability of that step under the rollout's weights."""

    times: list[tuple[float, float]]
    states: Tensor
    next_states: Tensor
    log_probs: Tensor
    noise_level: float
