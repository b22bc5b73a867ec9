"""Flow-GRPO-style policy gradient on the SDE rollout's own steps, with SRUM's dense per-token credit.

The rollout ran the sampler as an SDE (``srum.generation.sde``), so each step x_t -> x_next has a Gaussian
log-probability per latent token. An update re-evaluates the current model's velocity at the recorded x_t of some
steps, and minimises the clipped surrogate

    -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta KL(step || reference step),   rho = exp(log p - log p_old)

per token, averaged over tokens and steps. A is the group-relative advantage: the image's (``credit: sample``, the
usual GRPO form with per-token ratios) or the token's own from the reward maps (``credit: dense``, the credit that
SRUM's maps give and sample-level GRPO lacks). With a constant map the two are the same.

The first update of a rollout takes its old log-probabilities from the same forward, detached, so its ratio is
exactly 1 (the pure policy gradient); later updates of the same rollout compare with those stored values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from srum.generation.sde import sde_step_mean, token_log_prob
from srum.loss import LossConfig
from srum.model.packing import Text, VaeImage, pack
from srum.objectives.base import Backward, Candidates, Policy
from srum.objectives.groups import group_advantages


def clipped_surrogate(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Per-token PPO surrogate to minimise, (N,)."""
    ratio = torch.exp(log_probs - old_log_probs)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)


def step_kl(mean: Tensor, reference_mean: Tensor, std: float) -> Tensor:
    """KL between two Gaussian steps of equal std, per token and channel-averaged like the log-probabilities."""
    return ((mean - reference_mean) ** 2).mean(-1) / (2 * std**2)


class PolicyGradient:
    group_size_needed = 2

    def __init__(self, config: LossConfig) -> None:
        self.config = config
        self.settings = config.policy_gradient
        self.noise_level = self.settings.noise_level

    def _steps(self, policy: Policy, count: int, update: int) -> list[int]:
        wanted = self.settings.steps_per_update
        if wanted == 0 or wanted >= count:
            return list(range(count))
        order = torch.randperm(count, generator=policy.generator(0, 1000 + update))
        return sorted(order[:wanted].tolist())

    def step(self, policy: Policy, candidates: Candidates, update: int,
             backward: Backward) -> tuple[Tensor, dict[str, Tensor]]:
        trajectory = candidates.trajectory
        if trajectory is None:
            raise ValueError("loss.objective policy_gradient: expected SDE rollouts with a trajectory, got none")
        config = self.config
        advantages = group_advantages(candidates.reward_maps, candidates.group_size, config.credit,
                                      config.scale_advantages, config.advantage_eps)
        token_advantages = torch.cat([a.flatten() for a in advantages.tokens]).float().to(policy.device)
        if token_advantages.numel() != trajectory.states.shape[1]:
            raise ValueError(f"reward_maps: expected maps at the token grid ({trajectory.states.shape[1]} tokens in "
                             f"all), got {token_advantages.numel()} values")
        steps = self._steps(policy, len(trajectory.times), update)
        normaliser = policy.mean_tokens(token_advantages.numel()) * len(steps)
        prompts = [policy.encode(prompt) for prompt in candidates.prompts]
        model = policy.model.train()
        totals = {"policy_term": 0.0, "kl_term": 0.0, "ratio_mean": 0.0, "clipped_share": 0.0}
        for s in steps:
            t, t_next = trajectory.times[s]
            items = [[Text(ids), VaeImage(latent.float(), timestep=t)]
                     for ids, latent in zip(prompts, candidates.latents, strict=True)]
            batch = pack(items, model.config, policy.special).to(policy.device)
            x_t = trajectory.states[s].to(policy.device)
            mean, std = sde_step_mean(x_t, model.velocity_at(batch, x_t).float(), t, t_next, self.noise_level)
            log_probs = token_log_prob(trajectory.next_states[s].to(policy.device), mean, std)
            if update == 0:
                trajectory.log_probs[s] = log_probs.detach().to(trajectory.log_probs)
            old = trajectory.log_probs[s].to(policy.device)
            surrogate = clipped_surrogate(log_probs, old, token_advantages, self.settings.clip_range)
            loss = surrogate.sum() / normaliser
            totals["policy_term"] += float(loss.detach())
            if self.settings.kl_weight > 0:
                with torch.no_grad():
                    reference_mean, _ = sde_step_mean(x_t, policy.reference.velocity_at(batch, x_t).float(), t,
                                                      t_next, self.noise_level)
                kl = self.settings.kl_weight * step_kl(mean, reference_mean, std).sum() / normaliser
                totals["kl_term"] += float(kl.detach())
                loss = loss + kl
            backward(loss)
            with torch.no_grad():
                ratio = torch.exp(log_probs - old)
                totals["ratio_mean"] += float(ratio.mean()) / len(steps)
                totals["clipped_share"] += float(((ratio - 1).abs() > self.settings.clip_range).float().mean()) / len(
                    steps)
        terms = {name: torch.tensor(value) for name, value in totals.items()}
        terms["flat_groups"] = torch.tensor(float(advantages.flat_groups))
        return terms["policy_term"] + terms["kl_term"], terms
