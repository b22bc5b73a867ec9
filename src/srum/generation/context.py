"""A batch of inference contexts: what has been said and shown to the model, held in a KV cache.

Each context grows by prefilling items (text, ViT images, clean VAE images) exactly as BAGEL's inferencer does:
text is causal and takes consecutive position ids; an image block ``<|vision_start|> tokens <|vision_end|>``
shares one position id and advances the counter by one. Denoising queries and text decoding run against the
cache; only prefills and decoded tokens write to it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from srum.generation.cache import KVCache
from srum.model.bagel import Bagel
from srum.model.packing import Item, PackedBatch, Text, VaeImage, VitImage, pack
from srum.model.tokenizer import SpecialTokens


class ContextBatch:
    """B contexts over one model; every call takes one item (or one query) per context."""

    def __init__(self, model: Bagel, special: SpecialTokens, batch_size: int, cache: KVCache | None = None) -> None:
        self.model, self.special = model, special
        llm = model.config.llm
        device = model.language_model.lm_head.weight.device
        self.cache = cache or KVCache(llm.num_hidden_layers, batch_size, llm.num_key_value_heads, llm.head_dim,
                                      model.dtype, device)

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def device(self) -> torch.device:
        return self.cache.lengths.device

    def fork(self, rows: Tensor | None = None) -> ContextBatch:
        """Independent copies of the contexts (``rows`` selects or repeats them)."""
        return ContextBatch(self.model, self.special, 0, cache=self.cache.fork(rows))

    def _pack(self, items: list[Item]) -> PackedBatch:
        if len(items) != self.batch_size:
            raise ValueError(f"expected one item per context ({self.batch_size}), got {len(items)}")
        return pack([[item] for item in items], self.model.config, self.special).to(self.device)

    def _run(self, query: PackedBatch, latent_inputs: Tensor, causal: bool, update: bool,
             runs: Tensor | None = None) -> Tensor:
        """The decoder over one query per context, placed after the cache (``runs``: see ``score_runs``).
        Returns final-normed (N, hidden)."""
        query_lens = torch.tensor(query.layout.sample_lens, device=self.device)
        sample = torch.repeat_interleave(torch.arange(self.batch_size, device=self.device), query_lens)
        positions = query.position_ids + self.cache.positions[sample]
        embeds = self.model.embed(query, latent_inputs)
        attend = self.cache.attention(query_lens, causal, update, runs)
        hidden = self.model.hidden_states(query, embeds, attend, positions)
        if update:
            self.cache.advance(query_lens, torch.tensor(query.next_positions, device=self.device))
        return hidden

    @torch.no_grad()
    def add_text(self, token_ids: list[list[int]]) -> None:
        """Prefill a text segment ``<|im_start|> ids <|im_end|>`` into every context."""
        query = self._pack([Text(list(ids)) for ids in token_ids])
        self._run(query, query.latent_tokens, causal=True, update=True)

    @torch.no_grad()
    def add_vit_images(self, images: list[Tensor]) -> None:
        """Prefill images (3, H, W) in [-1, 1], sides multiples of the ViT patch, for understanding."""
        query = self._pack([VitImage(image) for image in images])
        self._run(query, query.latent_tokens, causal=False, update=True)

    @torch.no_grad()
    def add_vae_images(self, latents: list[Tensor]) -> None:
        """Prefill clean latent images (C, h, w) (t = 0), the conditioning images of editing."""
        query = self._pack([VaeImage(latent) for latent in latents])
        self._run(query, query.latent_tokens, causal=False, update=True)

    def denoising_query(self, grids: list[tuple[int, int]]) -> PackedBatch:
        """The query structure ``<|vision_start|> latent tokens <|vision_end|>`` of one image per context, built
        once and reused every step (``velocity`` fills in x_t and t)."""
        config = self.model.config
        patch = config.latent_patch_size
        latents = [torch.zeros(config.ae.z_channels, rows * patch, cols * patch) for rows, cols in grids]
        return self._pack([VaeImage(latent, timestep=1.0) for latent in latents])

    @torch.no_grad()
    def velocity(self, query: PackedBatch, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted velocity of the latent tokens x_t (N, latent_channels) at flow times t (N,), read against
        the cache without writing it."""
        query = dataclasses.replace(query, latent_timesteps=t.to(query.latent_timesteps))
        hidden = self._run(query, x_t, causal=False, update=False)
        return self.model.predict_velocity(hidden[query.latent_indexes], x_t, query.latent_timesteps)

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor) -> Tensor:
        """Feed one token per context at its next position and cache it; returns next-token logits (B, vocab)."""
        return self.score_tokens([[int(t)] for t in token_ids], update=True)[:, 0]

    @torch.no_grad()
    def score_runs(self, runs: list[list[list[int]]]) -> list[list[Tensor]]:
        """Teacher-forced next-token logits of several raw token runs per context, each run as if it alone
        followed its context (same positions, sees the whole context and its own earlier tokens), in one pass
        over the shared cache: per context, per run, (run length, vocab)."""
        if len(runs) != self.batch_size or not all(own and all(own) for own in runs):
            raise ValueError(f"expected one or more non-empty runs for each of the {self.batch_size} contexts, got "
                             f"{[[len(run) for run in own] for own in runs]}")
        lengths = [[len(run) for run in own] for own in runs]
        query = self._pack([Text([token for run in own for token in run], wrap=False) for own in runs])
        # every run starts at its context's next position
        query = dataclasses.replace(query, position_ids=torch.cat(
            [torch.arange(n) for own in lengths for n in own]).to(query.position_ids))
        run_ids = torch.cat([torch.full((n,), index) for own in lengths for index, n in enumerate(own)])
        hidden = self._run(query, query.latent_tokens, causal=True, update=False, runs=run_ids.to(self.device))
        logits = self.model.language_model.lm_head(hidden)  # (N, vocab)
        per_context = logits.split([sum(own) for own in lengths])
        return [list(part.split(own)) for part, own in zip(per_context, lengths, strict=True)]

    @torch.no_grad()
    def score_tokens(self, token_ids: list[list[int]], update: bool = False) -> Tensor:
        """Teacher-forced next-token logits of a raw token run per context (no markers added), causal after the
        cache: (B, longest run, vocab), rows past a context's run are zero."""
        query = self._pack([Text(list(ids), wrap=False) for ids in token_ids])
        hidden = self._run(query, query.latent_tokens, causal=True, update=update)
        logits = self.model.language_model.lm_head(hidden)  # (N, vocab)
        lengths = [end - start for start, end in query.sample_ranges]
        out = logits.new_zeros((self.batch_size, max(lengths), logits.shape[-1]))
        for row, (start, end) in enumerate(query.sample_ranges):
            out[row, : end - start] = logits[start:end]
        return out
