"""The BAGEL unified model: one decoder that reads text and ViT tokens and predicts flow velocities for latent
tokens, in a single packed training forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srum.model.attention import Backend
from srum.model.config import BagelConfig
from srum.model.embeddings import Connector, PositionTable, TimestepEmbedder
from srum.model.flow import interpolate
from srum.model.packing import PackedBatch
from srum.model.qwen2 import Attend, ExpertRouting, Qwen2ForCausalLM, packed_attention_fn
from srum.model.siglip import SiglipVisionModel


def is_generation_parameter(name: str) -> bool:
    """Whether a parameter of ``Bagel`` (by its name in ``named_parameters``) serves only image generation: the
    generation expert of every layer and the latent input/output projections and timestep embedding."""
    return "moe_gen" in name or name.startswith(("time_embedder.", "vae2llm.", "llm2vae."))


@dataclass
class BagelOutput:
    """What the training forward predicts, with the targets it was given.

    ``logits`` (Nce, vocab) at ``batch.ce_indexes``; ``velocity`` and ``target_velocity`` (Nmse, latent_channels)
    at the latent tokens with t > 0 (``mse_indexes`` into ``batch.latent_indexes``), target ``noise - x0``.
    """

    logits: Tensor
    labels: Tensor
    velocity: Tensor
    target_velocity: Tensor
    mse_indexes: Tensor

    def ce(self) -> Tensor:
        """Per-token cross-entropy, (Nce,)."""
        return F.cross_entropy(self.logits.float(), self.labels, reduction="none")

    def mse(self) -> Tensor:
        """Per-element squared velocity error, (Nmse, latent_channels)."""
        return (self.velocity.float() - self.target_velocity.float()) ** 2

    def loss(self, ce_weight: float = 1.0, mse_weight: float = 1.0) -> Tensor:
        """BAGEL's unified objective on one rank: mean CE over CE tokens + mean over tokens of the per-token
        channel-mean squared error. A term with no tokens contributes 0."""
        total = self.velocity.new_zeros((), dtype=torch.float32)
        if self.labels.numel():
            total = total + ce_weight * self.ce().mean()
        if self.velocity.numel():
            total = total + mse_weight * self.mse().mean()
        return total


class Bagel(nn.Module):
    """Language model, vision encoder + connector (``visual_und``), latent adapters (``visual_gen``).

    Parameter names equal the official checkpoint's (``reference/bagel-7b-mot-params.tsv``).
    """

    def __init__(self, config: BagelConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        self.language_model = Qwen2ForCausalLM(config.llm)
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(hidden)
            self.vae2llm = nn.Linear(config.latent_channels, hidden)
            self.llm2vae = nn.Linear(hidden, config.latent_channels)
            self.latent_pos_embed = PositionTable(config.max_latent_size, hidden)
            # A fresh model predicts zero velocity, as the official one does.
            nn.init.zeros_(self.llm2vae.weight)
            nn.init.zeros_(self.llm2vae.bias)
        if config.visual_und:
            self.vit_model = SiglipVisionModel(config.vit)
            self.connector = Connector(config.vit.hidden_size, hidden)
            self.vit_pos_embed = PositionTable(config.vit.num_patches_per_side, hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: Tensor, position_ids: Tensor, seqlens: tuple[int, ...],
                  backend: Backend = "sdpa") -> Tensor:
        """ViT tokens as decoder inputs: ``connector(siglip(patches)) + vit_pos_embed[pos]``. Returns (Nv, hidden)."""
        features = self.vit_model(patches.to(self.dtype), position_ids, seqlens, backend)
        return self.connector(features) + self.vit_pos_embed(position_ids).to(self.dtype)

    def embed_latents(self, x_t: Tensor, timesteps: Tensor, position_ids: Tensor) -> Tensor:
        """Latent tokens as decoder inputs: ``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]``."""
        return (self.vae2llm(x_t.to(self.dtype)) + self.time_embedder(timesteps)
                + self.latent_pos_embed(position_ids).to(self.dtype))

    def embed(self, batch: PackedBatch, latent_inputs: Tensor, backend: Backend = "sdpa") -> Tensor:
        """Decoder inputs of a packed batch, (L, hidden). ``latent_inputs`` (Nl, latent_channels) are the latent
        tokens as the model sees them (x_t), embedded with ``batch.latent_timesteps``."""
        embeds = torch.zeros(batch.sequence_length, self.config.llm.hidden_size, dtype=self.dtype,
                             device=batch.position_ids.device)
        embeds[batch.text_indexes] = self.embed_text(batch.text_ids)
        if batch.vit_indexes.numel():
            embeds[batch.vit_indexes] = self.embed_vit(batch.vit_patches, batch.vit_position_ids,
                                                       batch.vit_seqlens, backend)
        if batch.latent_indexes.numel():
            embeds[batch.latent_indexes] = self.embed_latents(latent_inputs, batch.latent_timesteps,
                                                              batch.latent_position_ids)
        return embeds

    def hidden_states(self, batch: PackedBatch, embeds: Tensor, attend: Attend,
                      position_ids: Tensor | None = None) -> Tensor:
        """The decoder over a packed batch, experts routed by token type. Returns final-normed (L, hidden)."""
        routing = ExpertRouting.from_gen_indexes(batch.latent_indexes, batch.sequence_length)
        positions = batch.position_ids if position_ids is None else position_ids
        return self.language_model.model(embeds, positions, routing, attend)

    def forward(self, batch: PackedBatch, noise: Tensor | None = None, generator: torch.Generator | None = None,
                backend: Backend = "sdpa") -> BagelOutput:
        """The packed training forward.

        Args:
            batch: the packed sequence (see ``srum.model.packing``).
            noise: (Nl, latent_channels) flow noise for every latent token; drawn from ``generator`` if None.
            backend: attention backend (``srum.model.attention``).
        """
        x0, t = batch.latent_tokens, batch.latent_timesteps
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = interpolate(x0, noise, t)
        hidden = self._decode(batch, x_t, backend)
        logits = self.language_model.lm_head(hidden[batch.ce_indexes])
        mse_indexes = (t > 0).nonzero().squeeze(1)
        target = (noise - x0)[mse_indexes]
        velocity = self.predict_velocity(hidden[batch.latent_indexes[mse_indexes]], x_t[mse_indexes],
                                         t[mse_indexes])
        return BagelOutput(logits=logits, labels=batch.ce_labels, velocity=velocity, target_velocity=target,
                           mse_indexes=mse_indexes)

    def _decode(self, batch: PackedBatch, x_t: Tensor, backend: Backend) -> Tensor:
        embeds = self.embed(batch, x_t, backend)
        return self.hidden_states(batch, embeds, packed_attention_fn(batch.layout, backend))

    def velocity_at(self, batch: PackedBatch, x_t: Tensor, backend: Backend = "sdpa") -> Tensor:
        """Velocities of the batch's latent tokens at given states ``x_t`` (Nl, latent_channels) and the batch's
        latent timesteps (all > 0), with gradients: the policy's step of a sampled trajectory, re-evaluated."""
        hidden = self._decode(batch, x_t, backend)
        return self.predict_velocity(hidden[batch.latent_indexes], x_t, batch.latent_timesteps)

    def predict_velocity(self, hidden: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity of latent tokens x_t (N, latent_channels) at times t (N,) from their final-normed hidden
        states, (N, latent_channels)."""
        if not self.config.visual_gen:
            return hidden.new_zeros(0, self.config.latent_channels)
        head = self.llm2vae(hidden)
        if self.config.prediction == "velocity":
            return head
        t = t.to(head.dtype).clamp_min(self.config.min_flow_time)[:, None]
        return (x_t.to(head.dtype) - head) / t
