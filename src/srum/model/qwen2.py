"""The Qwen2 decoder with BAGEL's Mixture-of-Transformers experts, over packed sequences.

Under MoT every decoder tensor exists twice: the understanding expert (plain Qwen2 names) serves text, image
markers and ViT tokens; the generation expert (``*_moe_gen``) serves VAE latent tokens. There is no router: an
``ExpertRouting`` says which packed positions belong to which expert. One attention over the whole packed
sequence mixes the two experts' keys and values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from srum.model.attention import Backend, PackedLayout, packed_attention
from srum.model.config import LLMConfig
from srum.model.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``attend(layer_index, q, k, v) -> out``: the attention of one decoder layer over packed tokens, q (L, Hq, D),
k and v (L, Hkv, D) after q/k norm and RoPE. Training attends within the packed sequence
(``packed_attention_fn``); inference attends to a KV cache as well (``srum.generation``)."""


def packed_attention_fn(layout: PackedLayout, backend: Backend = "sdpa") -> Attend:
    """The training ``Attend``: BAGEL's masks over one packed sequence, the same for every layer."""
    return lambda _layer, q, k, v: packed_attention(q, k, v, layout, backend=backend)



@dataclass(frozen=True)
class ExpertRouting:
    """Packed positions of each expert's tokens: ``und`` and ``gen`` are disjoint index tensors (int64)
    covering the sequence. ``gen is None`` sends every token to the understanding expert."""

    und: Tensor | None
    gen: Tensor | None

    @classmethod
    def from_gen_indexes(cls, gen_indexes: Tensor, length: int) -> ExpertRouting:
        if gen_indexes.numel() == 0:
            return cls(und=None, gen=None)
        is_gen = torch.zeros(length, dtype=torch.bool, device=gen_indexes.device)
        is_gen[gen_indexes] = True
        if bool(is_gen.all()):
            return cls(und=torch.empty(0, dtype=torch.long, device=gen_indexes.device), gen=gen_indexes)
        return cls(und=(~is_gen).nonzero().squeeze(1), gen=gen_indexes)

    def apply(self, x: Tensor, und_fn: Callable[[Tensor], Tensor], gen_fn: Callable[[Tensor], Tensor] | None,
              detach_und: bool = False) -> Tensor:
        """Row-wise ``und_fn`` / ``gen_fn`` over dim 0 of ``x``; ``gen_fn=None`` means a dense model."""
        if self.gen is None or gen_fn is None:
            out = und_fn(x)
            return out.detach() if detach_und else out
        if self.und is not None and self.und.numel() == 0:
            return gen_fn(x)
        und_out = und_fn(x[self.und])
        gen_out = gen_fn(x[self.gen])
        out = und_out.new_empty((x.shape[0], *und_out.shape[1:]))
        out[self.und] = und_out.detach() if detach_und else und_out
        out[self.gen] = gen_out.to(out.dtype)
        return out


def _head_norm(config: LLMConfig) -> nn.Module:
    return RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()


class PackedAttentionMoT(nn.Module):
    """Grouped-query attention with biases on q/k/v, per-head q/k RMSNorm, RoPE after the norm."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            head_dim)
        kv_dim = self.num_kv_heads * head_dim
        experts = ("", "_moe_gen") if config.is_mot else ("",)
        for suffix in experts:
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, hidden, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(hidden, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", _head_norm(config))
            setattr(self, f"k_norm{suffix}", _head_norm(config))
        self.is_mot = config.is_mot

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, f"{name}_moe_gen") if self.is_mot else None

    def project(self, h: Tensor, cos: Tensor, sin: Tensor, routing: ExpertRouting,
                detach_und: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Args: h (L, hidden) normed input. Returns q (L, Hq, D), k and v (L, Hkv, D); k after norm and RoPE."""
        length = h.shape[0]
        q = routing.apply(h, self.q_proj, self._gen("q_proj"), detach_und)
        k = routing.apply(h, self.k_proj, self._gen("k_proj"), detach_und)
        v = routing.apply(h, self.v_proj, self._gen("v_proj"), detach_und)
        q = q.view(length, self.num_heads, self.head_dim)  # (L, Hq, D)
        k = k.view(length, self.num_kv_heads, self.head_dim)  # (L, Hkv, D)
        v = v.view(length, self.num_kv_heads, self.head_dim)  # (L, Hkv, D)
        q = routing.apply(q, self.q_norm, self._gen("q_norm"), detach_und)
        k = routing.apply(k, self.k_norm, self._gen("k_norm"), detach_und)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output(self, attn: Tensor, routing: ExpertRouting, detach_und: bool = False) -> Tensor:
        """Args: attn (L, Hq, D). Returns (L, hidden)."""
        attn = attn.reshape(attn.shape[0], self.num_heads * self.head_dim)  # (L, hidden)
        return routing.apply(attn, self.o_proj, self._gen("o_proj"), detach_und)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, routing: ExpertRouting,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor], detach_und: bool = False) -> Tensor:
        q, k, v = self.project(h, cos, sin, routing, detach_und)
        return self.output(attend(q, k, v), routing, detach_und)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; under MoT each expert has its own norms, projections and MLP
    (``Qwen2MoTDecoderLayer``), otherwise one dense stack (``Qwen2DecoderLayer``)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.self_attn = PackedAttentionMoT(config)
        experts = ("", "_moe_gen") if config.is_mot else ("",)
        for suffix in experts:
            setattr(self, f"mlp{suffix}", SwiGLU(config.hidden_size, config.intermediate_size))
            setattr(self, f"input_layernorm{suffix}", RMSNorm(config.hidden_size, config.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{suffix}", RMSNorm(config.hidden_size, config.rms_norm_eps))

    def _gen(self, name: str) -> nn.Module | None:
        return getattr(self, f"{name}_moe_gen") if self.config.is_mot else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, routing: ExpertRouting,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Args: x (L, hidden) residual stream; cos, sin (L, head_dim). Returns (L, hidden)."""
        detach_und = self.config.freeze_und and self.training
        h = routing.apply(x, self.input_layernorm, self._gen("input_layernorm"), detach_und)
        x = x + self.self_attn(h, cos, sin, routing, attend, detach_und)
        h = routing.apply(x, self.post_attention_layernorm, self._gen("post_attention_layernorm"), detach_und)
        return x + routing.apply(h, self.mlp, self._gen("mlp"), detach_und)


class Qwen2Model(nn.Module):
    """Token embedding, decoder layers and the final norm(s)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_mot:
            self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, embeds: Tensor, position_ids: Tensor, routing: ExpertRouting, attend: Attend) -> Tensor:
        """Args: embeds (L, hidden); position_ids (L,) int. Returns the final-normed hidden states (L, hidden)."""
        cos, sin = self.rotary_emb(position_ids, embeds.dtype)
        x = embeds
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, routing, partial(attend, index))
        detach_und = self.config.freeze_und and self.training
        return routing.apply(x, self.norm, getattr(self, "norm_moe_gen", None), detach_und)


class Qwen2ForCausalLM(nn.Module):
    """The language model: ``model`` plus an untied ``lm_head`` (names as in the official checkpoint)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
