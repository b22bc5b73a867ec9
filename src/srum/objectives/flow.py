"""Flow-matching objectives: a fresh noising of each candidate's clean latent, the per-token weighted squared
velocity error, and the constraint term (``srum.loss.dense_reward_flow_loss``, Triton-fused on GPU).

``weighted`` weighs tokens by their reward map as is (the official SRUM loss). ``advantage_weighted`` weighs them
by exp(beta A) of their group-relative advantage, normalised to mean 1 within the group and clipped
(``srum.objectives.groups``): a better drawing of a prompt pulls harder than a worse one of the same prompt, and
a prompt whose candidates are all alike trains nothing. Both cost one forward and backward per update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from srum.loss import LossConfig, dense_reward_flow_loss, reward_term
from srum.model.flow import logit_normal_timesteps
from srum.model.packing import Text, VaeImage, pack
from srum.objectives.base import Backward, Candidates, Policy
from srum.objectives.groups import advantage_weights, group_advantages


class FlowObjective:
    """Args:
        config: the loss settings (``objective`` weighted or advantage_weighted).
        text_dropout: probability of training a candidate without its prompt (for CFG).
        timestep_shift: shift of the logit-normal training timesteps.
        reward_dropped_text: weight text-dropped candidates too (official); otherwise weight 1.
    """

    noise_level = None

    def __init__(self, config: LossConfig, text_dropout: float = 0.1, timestep_shift: float = 1.0,
                 reward_dropped_text: bool = True) -> None:
        self.config, self.text_dropout, self.timestep_shift = config, text_dropout, timestep_shift
        self.reward_dropped_text = reward_dropped_text
        self.group_size_needed = 2 if config.objective == "advantage_weighted" else 1

    def token_weights(self, candidates: Candidates) -> tuple[list[Tensor], dict[str, Tensor]]:
        if self.config.objective == "weighted":
            return candidates.reward_maps, {}
        config = self.config
        advantages = group_advantages(candidates.reward_maps, candidates.group_size, config.credit,
                                      config.scale_advantages, config.advantage_eps)
        weights = advantage_weights(advantages, candidates.group_size, config.beta, config.max_weight)
        return weights, {"flat_groups": torch.tensor(float(advantages.flat_groups))}

    def step(self, policy: Policy, candidates: Candidates, update: int,
             backward: Backward) -> tuple[Tensor, dict[str, Tensor]]:
        weights, terms = self.token_weights(candidates)
        generators = [policy.generator(image, 2 + update) for image in range(len(candidates.latents))]
        timesteps = [float(logit_normal_timesteps(1, self.timestep_shift, g)) for g in generators]
        dropped = [bool(torch.rand((), generator=g) < self.text_dropout) for g in generators]
        items = [[*([] if drop else [Text(policy.encode(prompt))]), VaeImage(latent.float(), timestep=t)]
                 for prompt, latent, t, drop in zip(candidates.prompts, candidates.latents, timesteps, dropped,
                                                    strict=True)]
        model = policy.model
        batch = pack(items, model.config, policy.special).to(policy.device)
        channels = model.config.latent_channels
        noise = torch.cat([torch.randn(rows * cols, channels, generator=g)
                           for (rows, cols), g in zip(batch.latent_grids, generators, strict=True)]).to(policy.device)
        model.train()
        out = model(batch, noise=noise)
        maps = [torch.ones_like(m) if drop and not self.reward_dropped_text else m
                for m, drop in zip(weights, dropped, strict=True)]
        constraint = self._constraint_target(policy, batch, noise, out.target_velocity)
        mean_tokens = policy.mean_tokens(out.velocity.shape[0])
        grids = list(batch.latent_grids)
        loss = dense_reward_flow_loss(out.velocity, out.target_velocity, constraint, maps, grids, self.config,
                                      num_tokens=mean_tokens, impl=policy.loss_impl)
        backward(loss)
        terms["reward_term"] = reward_term(out.velocity.detach(), out.target_velocity, maps, grids, self.config,
                                           num_tokens=mean_tokens)
        terms["constraint_term"] = loss.detach() - terms["reward_term"]
        return loss.detach(), terms

    def _constraint_target(self, policy: Policy, batch, noise: Tensor, target: Tensor) -> Tensor | None:
        if self.config.constraint == "none":
            return None
        if self.config.constraint == "sample":
            return target  # good = bad: the sampled image's own flow target
        with torch.no_grad():
            return policy.reference(batch, noise=noise).velocity
