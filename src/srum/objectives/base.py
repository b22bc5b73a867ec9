"""What every objective works with: the judged candidates of one update, the policy around the trained model, and
the ``Objective`` interface itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from srum.generation.sde import Trajectory
from srum.loss import Impl
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
