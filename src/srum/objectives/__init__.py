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

from srum.loss import LossConfig
from srum.objectives.base import Backward, Candidates, Objective, Policy
from srum.objectives.flow import FlowObjective
from srum.objectives.policy_gradient import PolicyGradient


def build_objective(config: LossConfig, text_dropout: float = 0.1, timestep_shift: float = 1.0,
                    reward_dropped_text: bool = True) -> Objective:
    """The objective ``config.objective`` names."""
    if config.objective == "policy_gradient":
        return PolicyGradient(config)
    return FlowObjective(config, text_dropout, timestep_shift, reward_dropped_text)


__all__ = ["Backward", "Candidates", "Objective", "Policy", "build_objective"]
