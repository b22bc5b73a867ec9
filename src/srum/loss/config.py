"""Options of the constrained dense-reward flow-matching loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConstraintTarget = Literal["sample", "reference", "none"]
SignedMode = Literal["off", "hinge"]


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

    def __post_init__(self) -> None:
        if self.constraint_weight < 0:
            raise ValueError(f"constraint_weight: expected >= 0, got {self.constraint_weight}")
        if self.constraint not in ("sample", "reference", "none"):
            raise ValueError(f"constraint: expected sample, reference or none, got {self.constraint!r}")
        if self.signed not in ("off", "hinge"):
            raise ValueError(f"signed: expected off or hinge, got {self.signed!r}")
        if self.margin <= 0:
            raise ValueError(f"margin: expected a positive number, got {self.margin}")
