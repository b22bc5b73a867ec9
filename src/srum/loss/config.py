"""Options of the constrained dense-reward flow-matching loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConstraintTarget = Literal["sample", "reference", "none"]
SignedMode = Literal["off", "hinge"]
ObjectiveName = Literal["weighted", "advantage_weighted", "policy_gradient"]
OBJECTIVES = ("weighted", "advantage_weighted", "policy_gradient")
Credit = Literal["sample", "dense"]


@dataclass(frozen=True)
class PolicyGradientConfig:
    """The Flow-GRPO-style objective (``srum.objectives.policy_gradient``)."""

    noise_level: float = 0.7
    """a of the SDE rollout: sigma_t = a sqrt(t / (1 - t)) (``srum.generation.sde``)."""
    clip_range: float = 0.2
    """epsilon of the clipped likelihood ratio."""
    kl_weight: float = 0.04
    """beta of the KL to the frozen reference (per step, per channel); 0: no reference needed."""
    steps_per_update: int = 0
    """Denoising steps trained per update, drawn at random (0: all), to bound the cost."""

    def __post_init__(self) -> None:
        if self.noise_level <= 0 or self.clip_range <= 0 or self.kl_weight < 0 or self.steps_per_update < 0:
            raise ValueError(f"policy_gradient: expected noise_level > 0, clip_range > 0, kl_weight >= 0 and "
                             f"steps_per_update >= 0, got {self}")


@dataclass(frozen=True)
class LossConfig:
    constraint_weight: float = 0.5
    """lambda: weight of the constraint term (0.5 in every official training script)."""
    constraint: ConstraintTarget = "sample"
    """What the constraint pulls toward: ``sample``, the flow target of the sampled image itself (official);
    ``reference``, a frozen reference model's velocity on the same inputs; ``none``, no constraint."""
    signed: SignedMode = "off"
    """``off``: rewards are weights in [0, 1+] (official). ``hinge``: rewards in [-1, 1]; negative tokens are
    pushed away from their target until the error reaches ``margin`` (bounded below, unlike ``r * error``)."""
    margin: float = 1.0
    """tau of the hinge: the channel-mean squared error beyond which repulsion stops."""
    objective: ObjectiveName = "weighted"
    """What a step minimises (``srum.objectives``): ``weighted``, the official (R + lambda) loss;
    ``advantage_weighted``, flow matching weighted by exp(beta A) of the group-relative advantage A;
    ``policy_gradient``, clipped likelihood ratios of SDE rollout steps on group-relative advantages."""
    credit: Credit = "dense"
    """Group-relative advantages per latent token from the reward maps (``dense``, SRUM's credit) or one per image
    from the map's mean (``sample``) - advantage_weighted and policy_gradient."""
    scale_advantages: bool = True
    """Divide advantages by the group's standard deviation (per token position for dense credit)."""
    advantage_eps: float = 1e-4
    """Added to that standard deviation."""
    beta: float = 1.0
    """Temperature of the advantage weights exp(beta A) (advantage_weighted)."""
    max_weight: float = 2.0
    """Advantage weights are normalised to mean 1 within a group, then clipped to [0, max_weight]."""
    policy_gradient: PolicyGradientConfig = PolicyGradientConfig()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.credit not in ("sample", "dense"):
            raise ValueError(f"credit: expected sample or dense, got {self.credit!r}")
        if self.advantage_eps <= 0 or self.beta <= 0 or not 1 <= self.max_weight <= 2:
            raise ValueError(f"advantage_eps and beta: expected > 0, max_weight in [1, 2]; got {self.advantage_eps}, "
                             f"{self.beta}, {self.max_weight}")
        if self.constraint_weight < 0:
            raise ValueError(f"constraint_weight: expected >= 0, got {self.constraint_weight}")
        if self.constraint not in ("sample", "reference", "none"):
            raise ValueError(f"constraint: expected sample, reference or none, got {self.constraint!r}")
        if self.signed not in ("off", "hinge"):
            raise ValueError(f"signed: expected off or hinge, got {self.signed!r}")
        if self.margin <= 0:
            raise ValueError(f"margin: expected a positive number, got {self.margin}")
