"""Objectives: what one update minimises, given a group of judged candidates per prompt.

Each objective is a small module behind one interface, importable without Lightning: ``SRUMModule`` conducts
(rollout -> judge -> maps -> objective -> step), the objective only computes and back-propagates its loss. A new
objective is a new file and one entry in ``build_objective``.

- ``weighted`` (``srum.objectives.flow``): the official (R + lambda) dense-reward flow loss;
- ``advantage_weighted`` (``srum.objectives.flow``): the same flow loss, tokens weighted by exp(beta A) of their
  group-relative advantage;
- ``policy_gradient`` (``srum.objectives.policy_gradient``): clipped likelihood ratios of the SDE rollout's own
  steps on group-relative advantages, per image or per token, with a KL anchor to the frozen reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from srum.generation.sde import Trajectory
from srum.loss import Impl, LossConfig
from srum.model.bagel import Bagel
from srum.model.tokenizer import SpecialTokens
from srum.reward.records import RewardRecord


@dataclass
class Candidates:
    """What one update trains on: per image its prompt, clean latent (C, h, w), token reward map and record; K
    adjacent images per prompt; the SDE trajectory for objectives that need it."""

    prompts: list[str]
    latents: list[Tensor]
    reward_maps: list[Tensor]
    records: list[RewardRecord]
    group_size: int = 1
    trajectory: Trajectory | None = None


@dataclass
class Policy:
    """The model being trained and what an objective needs around it.

    ``generator(image, purpose)`` is a seeded generator of this step (so a resumed or sharded run draws the same
    noise); ``mean_tokens(count)`` the loss normaliser (this rank's count averaged over ranks)."""

    model: Bagel
    reference: Bagel | None
    encode: Callable[[str], list[int]]
    special: SpecialTokens
    device: torch.device
    generator: Callable[[int, int], torch.Generator]
    mean_tokens: Callable[[int], Tensor]
    loss_impl: Impl = "auto"


Backward = Callable[[Tensor], None]


class Objective(Protocol):
    noise_level: float | None
    """Run rollouts as an SDE with this noise level and keep their trajectory (None: the ODE sampler)."""
    group_size_needed: int
    """Fewest candidates per prompt the objective can learn from."""

    def step(self, policy: Policy, candidates: Candidates, update: int,
             backward: Backward) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss of one update, call ``backward`` on it (once or in parts), and return the (detached)
        total and named terms to log."""
        ...


def build_objective(config: LossConfig, text_dropout: float = 0.1, timestep_shift: float = 1.0,
                    reward_dropped_text: bool = True) -> Objective:
    """The objective ``config.objective`` names."""
    if config.objective == "policy_gradient":
        from srum.objectives.policy_gradient import PolicyGradient

        return PolicyGradient(config)
    from srum.objectives.flow import FlowObjective

    return FlowObjective(config, text_dropout, timestep_shift, reward_dropped_text)


__all__ = ["Backward", "Candidates", "Objective", "Policy", "build_objective"]
