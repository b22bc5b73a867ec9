"""The constrained dense-reward flow loss over a whole ragged batch at once (the CPU fast path).

Like the fused kernel it computes the gradients in the forward pass (one pass over the (N, C) tensors for the
loss and one for the gradient), where autograd through ``pow``/``mean`` would make several; when the constraint
target is the flow target itself (good = bad, as in all official data) the two terms share one error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from srum.loss.bilinear import sample_maps
from srum.loss.config import LossConfig


def _terms(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, rewards: Tensor,
           config: LossConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, float]:
    """Per-token loss (N,), dL/d(reward) (N,), the slope a (N,) and the differences, all unnormalised."""
    diff = velocity - target  # (N, C)
    error = diff.pow(2).mean(-1)  # (N,)
    if config.signed == "hinge":
        active = error < config.margin
        per_token = rewards.clamp(min=0) * error + (-rewards).clamp(min=0) * (config.margin - error).clamp(min=0)
        slope = torch.where((rewards >= 0) | active, rewards, torch.zeros_like(rewards))
        d_reward = torch.where(rewards >= 0, error, -(config.margin - error).clamp(min=0))
    else:
        per_token, slope, d_reward = rewards * error, rewards, error
    weight = config.constraint_weight if config.constraint != "none" else 0.0
    if not weight or constraint_target is None:
        return per_token, d_reward, slope, diff, None, 0.0
    if constraint_target is target:  # the same regression twice: one error, the slope gains lambda
        return per_token + weight * error, d_reward, slope + weight, diff, None, 0.0
    pull = velocity - constraint_target
    return per_token + weight * pull.pow(2).mean(-1), d_reward, slope, diff, pull, weight


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a loss sums in: float64 stays float64 (the references), everything else (bf16, fp16) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _widened(velocity: Tensor, target: Tensor, constraint_target: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The inputs in the accumulation dtype, the constraint target still the target itself when it was."""
    dtype = accumulation_dtype(velocity.dtype)
    wide_target = target.to(dtype)
    if constraint_target is target:
        return velocity.to(dtype), wide_target, wide_target
    return velocity.to(dtype), wide_target, None if constraint_target is None else constraint_target.to(dtype)


class _WeightedFlowLoss(torch.autograd.Function):
    """Gradients formed in forward: with ``scale = 2 / (C N)``, dL/dv = scale (a * (v - t) + lambda (v - c)),
    dL/dt and dL/dc their negated parts, dL/dr = (per-token derivative) / N. Backward only scales them, and only
    those of inputs that need one. Sums run in float32 (float64 for float64 inputs); gradients come back in
    each input's own dtype."""

    @staticmethod
    def forward(ctx, velocity: Tensor, target: Tensor, constraint_target: Tensor | None, rewards: Tensor,
                config: LossConfig, normaliser: float) -> Tensor:
        wide = _widened(velocity, target, constraint_target)
        per_token, d_reward, slope, diff, pull, weight = _terms(*wide, rewards.to(wide[0].dtype), config)
        scale = 2.0 / (velocity.shape[1] * normaliser)
        from_error = diff * (scale * slope)[:, None]  # (N, C)
        from_pull = pull * (scale * weight) if pull is not None else None
        ctx.save_for_backward(from_error, from_pull, d_reward / normaliser)
        ctx.dtypes = [None if t is None else t.dtype for t in (velocity, target, constraint_target, rewards)]
        return per_token.sum() / normaliser

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        from_error, from_pull, d_reward = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * 6
        if wanted[0]:
            grads[0] = (from_error if from_pull is None else from_error + from_pull) * grad_output
        if wanted[1]:
            grads[1] = -from_error * grad_output
        if wanted[2] and from_pull is not None:
            grads[2] = -from_pull * grad_output
        if wanted[3]:
            grads[3] = d_reward * grad_output
        return tuple(g if g is None else g.to(dtype) for g, dtype in zip(grads, [*ctx.dtypes, None, None],
                                                                           strict=True))


def token_weighted_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, rewards: Tensor,
                        config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """The loss from per-token rewards (N,); see ``srum.loss.reference.reference_loss`` for the terms."""
    normaliser = float(velocity.shape[0] if num_tokens is None else num_tokens)
    return _WeightedFlowLoss.apply(velocity, target, constraint_target, rewards, config, normaliser)


def _sampled_rewards(reward_maps: list[Tensor], grids: list[tuple[int, int]], dtype: torch.dtype) -> Tensor:
    return sample_maps([m.to(accumulation_dtype(dtype)) for m in reward_maps], grids)


def vectorised_loss(velocity: Tensor, target: Tensor, constraint_target: Tensor | None, reward_maps: list[Tensor],
                    grids: list[tuple[int, int]], config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """Same arguments and result as ``reference_loss``; one gather samples every map."""
    rewards = _sampled_rewards(reward_maps, grids, velocity.dtype)
    return token_weighted_loss(velocity, target, constraint_target, rewards, config, num_tokens)


@torch.no_grad()
def reward_term(velocity: Tensor, target: Tensor, reward_maps: list[Tensor], grids: list[tuple[int, int]],
                config: LossConfig, num_tokens: float | None = None) -> Tensor:
    """The loss's reward term alone, ``sum_i w(r_i, e_i) / N``, for logging: one forward pass, no gradients."""
    normaliser = float(velocity.shape[0] if num_tokens is None else num_tokens)
    wide_velocity, wide_target, _ = _widened(velocity, target, None)
    rewards = _sampled_rewards(reward_maps, grids, velocity.dtype)
    return _terms(wide_velocity, wide_target, None, rewards, config)[0].sum() / normaliser
