"""Per-rank memory of an online SRUM run, part by part.

Three kinds of numbers, each row saying which: ``exact`` (from parameter shapes and the sharding rule: what the
tensors occupy), ``counted`` (what autograd saves, counted by running srum's decoder layer on the meta device at
the run's token counts), ``estimate`` (transient working memory of inference passes and allocator-level effects,
from a formula: a bound to leave headroom for, not a measurement). The peak is what is always held plus the
largest phase: the update, the rollout or one of the judge's passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from srum.model.autoencoder import build_autoencoder
from srum.model.config import BagelConfig
from srum.plan.activations import decoder_layer_bytes, mask_bytes
from srum.plan.judging import JudgePass
from srum.plan.shards import shard_numel, unit_sizes

Basis = Literal["exact", "counted", "estimate"]
HELD = "held"


@dataclass(frozen=True)
class RunShape:
    """What a run's memory depends on, read from its configuration."""

    config: BagelConfig
    ranks: int
    """Data-parallel ranks the weights are sharded over."""
    sharded: bool
    """FSDP2 (``ModelParallelStrategy``); otherwise every rank holds whole weights."""
    weight_dtype: torch.dtype
    """Master weights, gradients and optimizer state."""
    compute_dtype: torch.dtype
    """Gathered weights and activations."""
    activation_checkpointing: bool
    ema: bool
    reference: bool
    """A frozen reference copy (``constraint: reference`` or a policy-gradient KL anchor)."""
    images_per_prompt: int
    height: int
    width: int
    prompt_tokens: int
    """Assumed prompt length in tokens (the plan cannot tokenize a prompt file it does not read)."""
    guidance_contexts: int
    """Sequences per candidate in a denoising step: 1, plus one per CFG branch."""
    timesteps: int
    trajectory: bool
    """Every denoising step's states are kept for the update (policy gradient)."""
    judge: tuple[JudgePass, ...] = ()
    """The judge's passes on the rollout's GPU (none for the checker or an external VLM)."""
    reserve_bytes: int = 0
    """Kept free for the CUDA context and allocator fragmentation (assumed)."""

    @property
    def image_tokens(self) -> int:
        factor = self.config.latent_downsample
        return (self.height // factor) * (self.width // factor)


@dataclass(frozen=True)
class Row:
    part: str
    phase: str
    """``held`` all along, or the phase it is part of: ``update``, ``rollout``, ``scoring: <pass>``."""
    bytes: int
    basis: Basis


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cached_layer_bytes(config: BagelConfig, rows: int, cached: int, new: int, dtype: torch.dtype) -> int:
    """Working memory of one decoder layer without autograd, ``new`` tokens per row after ``cached`` ones in its
    KV cache (``srum.generation.cache``): keys and values concatenated and repeated to every query head, the
    additive mask, and the new tokens' queries, attention output, residual and MLP gate, up and product."""
    llm = config.llm
    keys = rows * (cached + new) * 2 * (llm.num_key_value_heads + llm.num_attention_heads) * llm.head_dim
    mask = rows * new * (cached + new)
    tokens = rows * new * (2 * llm.num_attention_heads * llm.head_dim + 2 * llm.hidden_size
                           + 3 * llm.intermediate_size)
    return (keys + mask + tokens) * dtype.itemsize


def _kv_bytes(config: BagelConfig, tokens: int, dtype: torch.dtype) -> int:
    llm = config.llm
    return tokens * llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim * dtype.itemsize


class MemoryPlan:
    """The parts of one run; ``rows(images)`` for ``images`` candidates per rank in each step."""

    def __init__(self, model: nn.Module, run: RunShape) -> None:
        """Args: model: the run's model on the meta device, trainable parameters marked as the run marks them."""
        self.run = run
        world = run.ranks if run.sharded else 1
        self.units = unit_sizes(model, world)
        with torch.device("meta"):
            self.autoencoder_numel = _numel(build_autoencoder(run.config.ae))
        self.reference_shard = sum(shard_numel(tuple(p.shape), world, 0) for name, p in model.named_parameters()
                                   if ".lora_" not in name)
        self.text_tokens = run.prompt_tokens + 2  # the image's start and end markers
        self.layer_bytes = decoder_layer_bytes(run.config.llm, self.text_tokens, run.image_tokens, 1,
                                               run.compute_dtype)  # per image: samples are apart

    def held(self) -> list[Row]:
        run, units, weight = self.run, self.units, self.run.weight_dtype.itemsize
        shard, trained = sum(u.shard for u in units), sum(u.trainable_shard for u in units)
        rows = [Row("weights (sharded)" if run.sharded else "weights", HELD, shard * weight, "exact"),
                Row("gradients", HELD, trained * weight, "exact"),
                Row("AdamW state", HELD, 2 * trained * weight, "exact"),
                Row("autoencoder", HELD, self.autoencoder_numel * weight, "exact")]
        if run.ema:
            rows.append(Row("EMA weights", HELD, trained * weight, "exact"))
        if run.reference:
            rows.append(Row("frozen reference", HELD, self.reference_shard * weight, "exact"))
        return rows

    def gathered(self) -> dict[str, Row]:
        """FSDP2 gathers a unit's weights in the compute dtype for its forward and backward (the next unit is
        prefetched meanwhile); heads and the root stay gathered. Backward adds the unit's gradient and its float32
        copy for the reduce-scatter. Unsharded mixed precision caches every weight's low-precision cast instead."""
        run, compute = self.run, self.run.compute_dtype.itemsize
        if not run.sharded:
            casts = sum(u.numel for u in self.units) * compute if run.compute_dtype != run.weight_dtype else 0
            return {"update": Row("weight casts (autocast)", "update", casts, "estimate")}
        kept = sum(u.numel for u in self.units if not u.reshard_after_forward) * compute
        largest = max(u.numel for u in self.units if u.reshard_after_forward)
        phases = ["rollout", *(f"scoring: {p.name}" for p in run.judge)]
        return {"update": Row("gathered units", "update", kept + largest * (3 * compute + 4), "estimate"),
                **{phase: Row("gathered units", phase, kept + 2 * largest * compute, "estimate") for phase in phases}}

    def update(self, images: int) -> list[Row]:
        run, config = self.run, self.run.config
        dtype, hidden = run.compute_dtype, config.llm.hidden_size
        text, image, layer = self.text_tokens, run.image_tokens, self.layer_bytes
        layers = config.llm.num_hidden_layers
        if run.activation_checkpointing:
            layers_part = images * (layers * (text + image) * hidden * dtype.itemsize + layer)
            name = f"activations (checkpointed: {layers} layer inputs + one layer)"
        else:
            layers_part, name = images * layers * layer, f"activations ({layers} layers)"
        outside = images * ((text + image) * hidden * (dtype.itemsize + 8) + image * config.latent_channels * 12)
        return [Row(name, "update", layers_part + mask_bytes(text, image, images, dtype), "counted"),
                Row("embeddings, final norm, loss", "update", outside, "estimate"),
                Row(self._candidates_name, "update", self._candidates_bytes(images), "exact")]

    @property
    def _candidates_name(self) -> str:
        return "candidates' latents" + (" and SDE trajectory" if self.run.trajectory else "")

    def _candidates_bytes(self, images: int) -> int:
        """The rollout's clean latents (float32), and with a trajectory each step's state and next state."""
        run = self.run
        states = 1 + (2 * (run.timesteps - 1) if run.trajectory else 0)
        return images * states * run.image_tokens * run.config.latent_channels * 4

    def rollout(self, images: int) -> list[Row]:
        run, config = self.run, self.run.config
        dtype, rows = run.compute_dtype, images * run.guidance_contexts
        ae = config.ae
        pixels_channels = ae.ch * ae.ch_mult[0] if ae.kind == "flux" else ae.in_channels
        return [Row("prompt KV cache", "rollout", _kv_bytes(config, rows * self.text_tokens, dtype), "exact"),
                Row("denoising pass (one layer)", "rollout",
                    _cached_layer_bytes(config, rows, self.text_tokens, run.image_tokens, dtype), "estimate"),
                Row(self._candidates_name, "rollout", self._candidates_bytes(images), "exact"),
                Row("decoding to pixels", "rollout", images * run.height * run.width * pixels_channels * 4 * 3,
                    "estimate")]

    def scoring(self, images: int) -> list[Row]:
        """Each judge pass is its own phase: the contexts' KV caches (grown by a decoded answer), one layer's
        working memory (the prefill or the options' pass) and the logits."""
        run, config, dtype = self.run, self.run.config, self.run.compute_dtype
        vocab = config.llm.vocab_size
        rows = []
        for judge_pass in run.judge:
            phase, contexts = f"scoring: {judge_pass.name}", images * judge_pass.contexts_per_image
            contexts = min(contexts, judge_pass.max_contexts or contexts)  # one pass at a time
            length, new = judge_pass.context_tokens, judge_pass.new_tokens
            if judge_pass.options == 0:  # decoding: the cache grows by the answer, one token per step
                cache = _kv_bytes(config, contexts * (length + new), dtype)
                working = max(_cached_layer_bytes(config, contexts, 0, length, dtype),
                              _cached_layer_bytes(config, contexts, length + new, 1, dtype))
                logits = contexts * vocab * 4 * 2
            else:  # teacher-forced options: one query of all of a context's options over its shared cache
                new *= judge_pass.options
                cache = _kv_bytes(config, contexts * length, dtype)
                working = max(_cached_layer_bytes(config, contexts, 0, length, dtype),
                              _cached_layer_bytes(config, contexts, length, new, dtype))
                logits = contexts * new * vocab * (dtype.itemsize + 8)
            rows += [Row(f"{judge_pass.name}: KV caches", phase, cache, "estimate"),
                     Row(f"{judge_pass.name}: one layer's working memory", phase, working, "estimate"),
                     Row(f"{judge_pass.name}: logits", phase, logits, "estimate")]
        return rows

    def rows(self, images: int) -> list[Row]:
        gathered = self.gathered()
        phases = [*self.update(images), *self.rollout(images), *self.scoring(images)]
        return [*self.held(), *gathered.values(), *phases]

    def peak(self, images: int) -> int:
        return peak_bytes(self.rows(images)) + self.run.reserve_bytes

    def largest_images(self, budget: int, limit: int = 4096) -> int:
        """The most candidates per rank whose peak fits ``budget`` bytes (0: not even one)."""
        low, high = 0, limit
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.peak(middle) <= budget else (low, middle - 1)
        return low


def phase_totals(rows: list[Row]) -> dict[str, int]:
    """What each phase holds on top of what is held all along."""
    totals: dict[str, int] = {}
    for row in rows:
        if row.phase != HELD:
            totals[row.phase] = totals.get(row.phase, 0) + row.bytes
    return totals


def peak_bytes(rows: list[Row]) -> int:
    return sum(r.bytes for r in rows if r.phase == HELD) + max(phase_totals(rows).values(), default=0)
