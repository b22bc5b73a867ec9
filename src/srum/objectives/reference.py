"""The objectives' maths written plainly, loop by loop in float64, straight from the module docstrings.

Ground truth for tests of the vectorised code (``groups``, ``srum.generation.sde``, ``policy_gradient``); slow,
never used in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Normal


@dataclass
class ReferenceAdvantages:
    """Per image (group after group): ``rewards`` and ``sample`` advantages (B,), ``tokens`` maps, ``informative``
    (B,) bools, ``flat_groups`` the number of groups without spread. All float64."""

    rewards: Tensor
    sample: Tensor
    tokens: list[Tensor]
    informative: Tensor
    flat_groups: int


def _standardise(values: list[float], scale: bool, eps: float) -> list[float]:
    """Each value minus the mean, over the population std plus eps when ``scale``. The mean is taken about the
    first value, so values that are all equal centre to exactly zero."""
    first = values[0]
    offset = math.fsum(v - first for v in values) / len(values)
    centred = [(v - first) - offset for v in values]
    if not scale:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(values))
    return [c / (std + eps) for c in centred]


def group_advantages(reward_maps: list[Tensor], group_size: int, credit: str = "dense", scale: bool = True,
                     eps: float = 1e-4) -> ReferenceAdvantages:
    """Group-relative advantages of B = G * K maps, K adjacent per prompt; a group whose candidates are all alike
    (equal maps for dense credit, equal mean rewards for sample credit) gets zero advantage and is counted."""
    count = len(reward_maps)
    if group_size < 2 or count % group_size:
        raise ValueError(f"expected groups of K >= 2 filling the batch, got K = {group_size} for {count}")
    if len({tuple(m.shape) for m in reward_maps}) != 1:
        raise ValueError("expected one token grid for all maps")
    maps = [m.double() for m in reward_maps]
    rows, cols = maps[0].shape
    rewards = [float(m.sum()) / m.numel() for m in maps]
    sample = [0.0] * count
    tokens = [torch.zeros(rows, cols, dtype=torch.float64) for _ in range(count)]
    informative = [False] * count
    flat = 0
    for start in range(0, count, group_size):
        members = range(start, start + group_size)
        if credit == "dense":
            spread = any(not torch.equal(maps[i], maps[start]) for i in members)
        else:
            spread = any(rewards[i] != rewards[start] for i in members)
        if not spread:  # every candidate alike: zero advantage everywhere
            flat += 1
            continue
        for i, value in zip(members, _standardise([rewards[i] for i in members], scale, eps), strict=True):
            sample[i], informative[i] = value, True
        for r in range(rows):
            for c in range(cols):
                if credit == "dense":
                    values = _standardise([float(maps[i][r, c]) for i in members], scale, eps)
                else:
                    values = [sample[i] for i in members]
                for i, value in zip(members, values, strict=True):
                    tokens[i][r, c] = value
    return ReferenceAdvantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(sample, dtype=torch.float64),
                               tokens, torch.tensor(informative), flat)


def advantage_weights(advantages: ReferenceAdvantages, group_size: int, beta: float,
                      max_weight: float) -> list[Tensor]:
    """exp(beta A) per token, divided by its mean over the group's tokens, clipped to max_weight; zero for images
    of groups without spread."""
    weights = []
    for start in range(0, len(advantages.tokens), group_size):
        members = range(start, start + group_size)
        raw = {i: [[math.exp(beta * float(a)) for a in row] for row in advantages.tokens[i].double()]
               for i in members}
        values = [w for i in members for row in raw[i] for w in row]
        mean = sum(values) / len(values)
        for i in members:
            keep = 1.0 if bool(advantages.informative[i]) else 0.0
            weights.append(torch.tensor([[keep * min(w / mean, max_weight) for w in row] for row in raw[i]],
                                        dtype=torch.float64))
    return weights


def step_sigma(t: float, t_next: float, noise_level: float) -> float:
    """sigma_t = a sqrt(t / (1 - t)), the denominator taken at t_next when t = 1."""
    denominator = 1.0 - t_next if t >= 1.0 else 1.0 - t
    return noise_level * math.sqrt(t / denominator)


def sde_step_mean(x: Tensor, velocity: Tensor, t: float, t_next: float, noise_level: float) -> tuple[Tensor, float]:
    """Mean ``x + dt [v + sigma^2 / (2 t) (x + (1 - t) v)]`` (float64, token by token) and std sigma sqrt(-dt)."""
    sigma = step_sigma(t, t_next, noise_level)
    dt = t_next - t
    x, velocity = x.double(), velocity.double()
    rows = [x[n] + dt * (velocity[n] + sigma**2 / (2 * t) * (x[n] + (1 - t) * velocity[n])) for n in range(len(x))]
    return torch.stack(rows), sigma * math.sqrt(-dt)


def token_log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """Per token (row): the float64 Normal(mean, std) log-density of x_next, averaged over channels."""
    mean = mean.double()
    scale = torch.tensor(std, dtype=torch.float64)
    return torch.stack([Normal(mean[n], scale).log_prob(x_next[n].double()).mean() for n in range(len(mean))])


def step_log_prob(x: Tensor, velocity: Tensor, x_next: Tensor, t: float, t_next: float,
                  noise_level: float) -> Tensor:
    """Per-token log-probability of the SDE step x -> x_next under ``velocity`` (float64)."""
    mean, std = sde_step_mean(x, velocity, t, t_next, noise_level)
    return token_log_prob(x_next, mean, std)


def policy_gradient_loss(log_probs: list[Tensor], old_log_probs: list[Tensor], advantages: Tensor, clip_range: float,
                         kl_weight: float = 0.0, means: list[Tensor] | None = None,
                         reference_means: list[Tensor] | None = None, stds: list[float] | None = None,
                         num_tokens: float | None = None) -> tuple[Tensor, Tensor]:
    """Per step s and token n: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = exp(lp - lp_old), plus
    kl_weight * mean_c (mu - mu_ref)^2 / (2 std^2); both summed and divided by tokens x steps.

    Returns (policy term, KL term), float64."""
    steps = len(log_probs)
    normaliser = (len(advantages) if num_tokens is None else num_tokens) * steps
    policy = torch.zeros((), dtype=torch.float64)
    kl = torch.zeros((), dtype=torch.float64)
    for s in range(steps):
        for n in range(len(advantages)):
            a = advantages[n].double()
            rho = torch.exp(log_probs[s][n].double() - old_log_probs[s][n].double())
            clipped = torch.clamp(rho, 1 - clip_range, 1 + clip_range)
            policy = policy - torch.minimum(rho * a, clipped * a)
            if kl_weight > 0:
                gap = means[s][n].double() - reference_means[s][n].double()
                kl = kl + kl_weight * (gap**2).mean() / (2 * stds[s] ** 2)
    return policy / normaliser, kl / normaliser
