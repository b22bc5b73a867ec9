"""``SRUMModule``: the unified model trained on its own rewarded generations.

The module conducts; the parts live elsewhere. Online mode runs the whole loop in ``training_step``: draw K
candidates per prompt with the current weights (no grad, eval mode), have the judge score them
(``srum.reward.judges``: the model itself, the checker or an external VLM), paint per-token reward maps, and let
the objective (``srum.objectives``: the official weighted loss, advantage weighting or policy gradient) compute
and back-propagate the update. Offline mode takes the same step on reward records written by ``srum generate``
+ ``srum score`` (or official SRUM records).

Optimisation is manual so that a step whose loss or gradient is not finite can be skipped, counted and logged
while training goes on. Everything random in a step is seeded from (seed, batch index, rank), so a resumed run
repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from srum.generation.pipeline import GeneratedImages, Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig
from srum.loss import Impl, LossConfig
from srum.model.autoencoder import from_uint8_image
from srum.model.bagel import Bagel, is_generation_parameter
from srum.model.checkpoint import load_checkpoint
from srum.model.tokenizer import load_tokenizer
from srum.objectives import Candidates, Policy, build_objective
from srum.reward.judges import ScoringConfig, build_judge
from srum.reward.maps import MapConfig, token_rewards
from srum.reward.records import RewardRecord, scored_regions
from srum.reward.rollouts import read_record_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutConfig:
    """How online candidates are drawn."""

    images_per_prompt: int = 1
    """K candidates per prompt, each from its own seed."""
    height: int = 1024
    """Image height in pixels."""
    width: int = 1024
    """Image width in pixels."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler and guidance settings of the rollouts."""
    think: bool = False
    """Plan in text before drawing."""
    max_think_tokens: int = 1000
    """Plan length limit."""
    updates_per_rollout: int = 1
    """Optimizer steps taken on one rollout (each with fresh timesteps and noise)."""
    source: Literal["model", "ground_truth"] = "model"
    """Where candidates come from: the model's own sampler, or clean renders of the prompts (ShapeWorld only: the
    ceiling arm, perfect supervision at the same step budget)."""

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1 or self.updates_per_rollout < 1:
            raise ValueError(f"rollout: expected images_per_prompt >= 1 and updates_per_rollout >= 1, got "
                             f"{self.images_per_prompt} and {self.updates_per_rollout}")
        if self.source not in ("model", "ground_truth"):
            raise ValueError(f"rollout.source: expected model or ground_truth, got {self.source!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    """Peak learning rate (the official SRUM recipe)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-15
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up from 0 (step 0 uses lr 0), then constant."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""

    def __post_init__(self) -> None:
        """Settings that would silently train the wrong way are refused (a negative clip flips every gradient)."""
        beta1, beta2 = self.betas
        if not (self.lr > 0 and self.grad_clip > 0 and self.eps > 0 and self.weight_decay >= 0
                and self.warmup_steps >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"optim: expected lr > 0, grad_clip > 0, eps > 0, weight_decay >= 0, warmup_steps >= 0 "
                             f"and betas in [0, 1); got {self}")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (through peft) on the trained expert's projections: for fewer GPUs, the base weights
    stay frozen and only the adapters train; ``srum export`` merges them into the official layout."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 32.0
    """Scale numerator: the adapter adds (alpha / r) * B A."""


def lora_targets(trainable: str) -> str:
    """peft ``target_modules`` pattern: the generation expert's attention and MLP projections, and the
    understanding expert's too when everything trains."""
    suffix = "_moe_gen" if trainable == "generation" else "(_moe_gen)?"
    return (rf".*\.self_attn\.(q|k|v|o)_proj{suffix}|.*\.mlp{suffix}\.(gate|up|down)_proj")


def mark_trainable(model: Bagel, trainable: str, lora: LoraConfig | None) -> None:
    """The vision encoder and connector stay frozen; the sin-cos tables are buffers. With LoRA, adapters are
    injected and only they train."""
    model.requires_grad_(False)
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                target_modules=lora_targets(trainable))
        inject_adapter_in_model(config, model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".lora_" in name)
        return
    for name, parameter in model.named_parameters():
        if name.startswith(("vit_model.", "connector.")):
            continue
        parameter.requires_grad_(trainable == "all" or is_generation_parameter(name))


def _warmup(warmup_steps: int):
    return lambda step: min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


class SRUMModule(L.LightningModule):
    """The unified model, its frozen autoencoder and (for ``loss.constraint: reference``) a frozen reference copy.

    Args:
        checkpoint: checkpoint folder in the official layout (model, autoencoder, tokenizer).
        mode: ``online`` (rollouts inside each step, from a prompt file) or ``offline`` (reward records).
        trainable: ``all`` language-model weights and adapters (official), or ``generation`` expert only.
        loss: the objective (``loss.objective``) and the constrained dense-reward loss's settings.
        reward_map: how scores become maps.
        rollout: online candidate drawing.
        scoring: online judging.
        optim: optimizer and schedule.
        text_dropout: probability of training a sample without its prompt (for CFG).
        timestep_shift: training timestep shift (1: logit-normal t as is).
        reward_dropped_text: weight text-dropped samples by their reward too (official); otherwise weight 1.
        ema_decay: keep an exponential moving average of the trained weights with this decay (None: off).
        lora: train low-rank adapters instead of the weights (None: off).
        loss_impl: loss implementation: auto (Triton on GPU, vectorised PyTorch on CPU), triton, torch, reference.
        activation_checkpointing: recompute each decoder layer in backward (with the FSDP2 strategy).
        max_skips_in_a_row: stop with an error after this many consecutive non-finite steps (a run that can no
            longer train would otherwise skip forever).
        seed: seed of everything random in a step, with the batch index and rank.
    """

    def __init__(self, checkpoint: Path, mode: Literal["online", "offline"] = "online",
                 trainable: Literal["all", "generation"] = "all", loss: LossConfig = LossConfig(),
                 reward_map: MapConfig = MapConfig(), rollout: RolloutConfig = RolloutConfig(),
                 scoring: ScoringConfig = ScoringConfig(), optim: OptimConfig = OptimConfig(),
                 text_dropout: float = 0.1, timestep_shift: float = 1.0, reward_dropped_text: bool = True,
                 ema_decay: float | None = None, lora: LoraConfig | None = None, loss_impl: Impl = "auto",
                 activation_checkpointing: bool = False, max_skips_in_a_row: int = 5, seed: int = 0) -> None:
        super().__init__()
        if mode not in ("online", "offline"):
            raise ValueError(f"mode: expected online or offline, got {mode!r}")
        if not 0 <= text_dropout < 1:
            raise ValueError(f"text_dropout: expected a probability in [0, 1), got {text_dropout}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay: expected a decay in [0, 1) (or none), got {ema_decay}")
        self.checkpoint, self.mode, self.trainable = Path(checkpoint), mode, trainable
        self.loss_config, self.map_config = loss, reward_map
        self.rollout, self.scoring, self.optim = rollout, scoring, optim
        self.text_dropout, self.timestep_shift = text_dropout, timestep_shift
        self.reward_dropped_text, self.ema_decay, self.lora = reward_dropped_text, ema_decay, lora
        self.loss_impl = loss_impl
        self.activation_checkpointing, self.seed = activation_checkpointing, seed
        self.objective = build_objective(loss, text_dropout, timestep_shift, reward_dropped_text)
        if mode == "online" and rollout.images_per_prompt < self.objective.group_size_needed:
            raise ValueError(f"rollout.images_per_prompt: loss.objective {loss.objective} compares candidates of "
                             f"a prompt; expected >= {self.objective.group_size_needed}, got "
                             f"{rollout.images_per_prompt}")
        if mode == "offline" and loss.objective != "weighted":
            raise ValueError(f"loss.objective: offline records hold no candidate groups; expected weighted, got "
                             f"{loss.objective}")
        if self.objective.noise_level is not None and (rollout.sampler.cfg_text_scale > 1 or rollout.think
                                                       or rollout.source != "model"):
            raise ValueError("loss.objective policy_gradient: re-evaluates the conditional velocity of the model's "
                             "own steps; expected rollout.sampler.cfg_text_scale 1, think off and source model")
        self.automatic_optimization = False
        self.model: Bagel | None = None
        if max_skips_in_a_row < 1:
            raise ValueError(f"max_skips_in_a_row: expected >= 1, got {max_skips_in_a_row}")
        self.max_skips_in_a_row = max_skips_in_a_row
        self.skipped_steps = self._skipped_in_a_row = 0
        self._images_per_rank = 0

    # ----------------------------------------------------------------------------------------------- building

    def configure_model(self) -> None:
        if self.model is not None:
            return
        loaded = load_checkpoint(self.checkpoint)
        self.model = loaded.model
        self.autoencoder = loaded.autoencoder.requires_grad_(False)
        self.tokenizer, self.special = load_tokenizer(self.checkpoint)
        if self.needs_reference:
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        mark_trainable(self.model, self.trainable, self.lora)
        if self.device_mesh is not None:
            from srum.train.parallel import parallelize

            precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
            parallelize(self.model, getattr(self, "reference", None), self.device_mesh,
                        self.activation_checkpointing, precision)
        if self.ema_decay is not None:  # after sharding: the averages are sharded like the weights
            self.ema = torch.nn.ParameterDict({
                name.replace(".", "/"): torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                for name, p in self.model.named_parameters() if p.requires_grad})
        self.pipeline = Pipeline(self.model, self.autoencoder, self.tokenizer, self.special)
        self.model.train()  # the pipeline puts it in eval mode; rollouts switch modes themselves
        self.scorer = build_judge(self.scoring, self.pipeline, self.device) if self.mode == "online" else None

    @property
    def needs_reference(self) -> bool:
        """A frozen reference copy is kept: the constraint pulls toward it, or the policy gradient's KL anchor."""
        pg = self.loss_config.objective == "policy_gradient" and self.loss_config.policy_gradient.kl_weight > 0
        return self.loss_config.constraint == "reference" or pg

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps,
                                      weight_decay=self.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(self.optim.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- samples

    def _seed(self, index: int, image: int, purpose: int) -> int:
        """A seed for one image of batch ``index``: ``image`` counts over the global batch (this rank's images
        follow the lower ranks'), so a run on W ranks draws what one process would on the same data."""
        position = self.global_rank * self._images_per_rank + image
        digest = hashlib.sha256(f"{self.seed}/{index}/{position}/{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def _generator(self, index: int, image: int, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(index, image, purpose))

    @torch.no_grad()
    def rollout_and_score(self, prompts: list[Prompt], index: int) -> tuple[Candidates, dict[str, float]]:
        """K candidates per prompt (adjacent) drawn and judged; returns them and timing."""
        self.model.eval()
        k = self.rollout.images_per_prompt
        texts = [p.text for p in prompts for _ in range(k)]
        self._images_per_rank = len(texts)
        seeds = [self._seed(index, image, purpose=0) for image in range(len(texts))]
        start = time.perf_counter()
        generated = self._draw(texts, seeds)
        middle = time.perf_counter()
        names = [f"{index}_{i}.png" for i in range(len(texts))]
        records = self.scorer.score(generated.images, texts, names)
        end = time.perf_counter()
        candidates = Candidates(texts, [latent.to(self.device) for latent in generated.latents],
                                self.reward_maps(records), records, k, generated.trajectory)
        return candidates, {"rollout": middle - start, "scoring": end - middle}

    def _draw(self, texts: list[str], seeds: list[int]) -> GeneratedImages:
        if self.rollout.source == "ground_truth":
            from srum.shapeworld.world import ground_truth_image

            images = [ground_truth_image(text, seed) for text, seed in zip(texts, seeds, strict=True)]
            pixels = torch.stack([from_uint8_image(image) for image in images]).to(self.device)
            return GeneratedImages(images, list(self.autoencoder.encode(pixels, sample=False)))
        decoding = DecodingConfig(max_new_tokens=self.rollout.max_think_tokens) if self.rollout.think else None
        return self.pipeline.generate(texts, seeds, self.rollout.sampler, self.rollout.height, self.rollout.width,
                                      self.rollout.think, decoding, noise_level=self.objective.noise_level)

    def reward_maps(self, records: list[RewardRecord]) -> list[Tensor]:
        """Per image a map at its token grid (so the loss's bilinear sampling is the identity)."""
        factor = self.model.config.latent_downsample
        grids = [(r.height // factor, r.width // factor) for r in records]
        rewards = token_rewards(scored_regions(records, self.scoring.score_kind), [(r.height, r.width)
                                for r in records], grids, self.map_config)
        return [part.view(rows, cols).to(self.device) for part, (rows, cols)
                in zip(rewards.split([rows * cols for rows, cols in grids]), grids, strict=True)]

    @torch.no_grad()
    def offline_samples(self, records: list[RewardRecord], index: int) -> Candidates:
        """Records' images encoded by the autoencoder (a posterior sample, as officially). The good image is
        the scored one in all official data, so it is encoded once and reused."""
        folder = self.trainer.datamodule.image_dir
        self._images_per_rank = len(records)
        latents = []
        for position, record in enumerate(records):
            image = from_uint8_image(read_record_image(Path(folder), record))
            generator = self._generator(index, position, purpose=1)
            latents.append(self.autoencoder.encode(image[None].to(self.device), generator=generator)[0])
        return Candidates([r.prompt for r in records], latents, self.reward_maps(records), records)

    def policy(self, index: int) -> Policy:
        """The model as the objective of batch ``index`` sees it."""
        return Policy(self.model, getattr(self, "reference", None),
                      lambda text: self.tokenizer.encode(text, add_special_tokens=False), self.special, self.device,
                      lambda image, purpose: self._generator(index, image, purpose), self._mean_tokens,
                      self.loss_impl)

    def _mean_tokens(self, count: int) -> Tensor:
        """The loss normaliser: the mean token count per rank. Each rank's sum over its tokens divided by it,
        averaged over ranks by the gradient reduction, weighs every token of the global batch equally."""
        tokens = torch.tensor(float(count), device=self.device)
        return tokens if self._trainer is None else self.trainer.strategy.reduce(tokens, reduce_op="mean")

    # -------------------------------------------------------------------------------------------------- steps

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batches are prompts or records (no tensors); their tensors are made on the device in the step."""
        return batch

    def training_step(self, batch: tuple[int, list[Any]], batch_idx: int) -> None:
        index, items = batch
        timing: dict[str, float] = {}
        if self.mode == "online":
            samples, timing = self.rollout_and_score(items, index)
        else:
            start = time.perf_counter()
            samples = self.offline_samples(items, index)
            timing["encode"] = time.perf_counter() - start
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        start = time.perf_counter()
        policy = self.policy(index)
        for update in range(self.rollout.updates_per_rollout if self.mode == "online" else 1):
            optimizer.zero_grad(set_to_none=False)
            loss, terms = self.objective.step(policy, samples, update, self.manual_backward)
            if not bool(torch.isfinite(loss)):
                optimizer.zero_grad(set_to_none=False)
                self._skip(f"non-finite loss {float(loss)} at batch {index}", loss, loss.new_tensor(math.nan))
                continue
            trained = [p for p in self.model.parameters() if p.requires_grad]
            for parameter in trained:
                # Weights off the loss's path (lm_head, say) get a zero gradient rather than none, so every
                # trained weight has optimizer state and sharded checkpoints stay loadable; AdamW leaves them
                # unchanged (zero moments).
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
            norm = torch.nn.utils.clip_grad_norm_(trained, self.optim.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if not bool(torch.isfinite(norm)):
                optimizer.zero_grad(set_to_none=False)
                self._skip(f"non-finite gradient norm at batch {index}", loss, norm)
                continue
            optimizer.step()
            scheduler.step()
            self._skipped_in_a_row = 0
            self._update_ema()
            self.log_dict({"train/loss": loss.detach(), "train/grad_norm": norm.detach(),
                           **{f"train/{k}": v for k, v in terms.items()}}, sync_dist=True)
        timing["update"] = time.perf_counter() - start
        self._log_step(samples, timing)

    def _skip(self, reason: str, loss: Tensor, norm: Tensor) -> None:
        """Count a skipped update and log its own (non-finite) loss and gradient norm, so no logged row shows
        the previous update's values as this one's."""
        self.log_dict({"train/loss": loss.detach(), "train/grad_norm": norm.detach()}, sync_dist=True)
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        log.warning("skipped a step: %s (%d skipped so far)", reason, self.skipped_steps)
        if self._skipped_in_a_row >= self.max_skips_in_a_row:
            raise RuntimeError(f"max_skips_in_a_row: {self._skipped_in_a_row} steps in a row had a non-finite loss or "
                               f"gradient (last: {reason}); expected training to recover. Lower optim.lr, check the "
                               f"weights and reward maps, or raise max_skips_in_a_row")

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_decay is None:
            return
        pairs = [(self.ema[name.replace(".", "/")], p) for name, p in self.model.named_parameters() if p.requires_grad]
        torch._foreach_lerp_([a for a, _ in pairs], [p for _, p in pairs], 1.0 - self.ema_decay)

    def _log_step(self, samples: Candidates, timing: dict[str, float]) -> None:
        rewards = torch.cat([m.flatten() for m in samples.reward_maps])
        kind = self.scoring.score_kind
        globals_ = [r.global_scores.get(kind) for r in samples.records]
        regions = [s.scores.get(kind) for r in samples.records for s in r.regions]
        total = sum(timing.values()) or 1.0
        metrics = {"train/reward_mean": rewards.mean(), "train/reward_std": rewards.std() if rewards.numel() > 1
                   else rewards.new_zeros(()), "train/skipped_steps": float(self.skipped_steps),
                   "train/score_failures": float(sum(g is None for g in globals_) + sum(s is None for s in regions)),
                   "train/regions_per_image": len(regions) / max(len(samples.records), 1),
                   "train/dropped_regions": float(sum(len(r.dropped) for r in samples.records)),
                   "train/clamped_scores": float(sum(r.clamped for r in samples.records)),
                   "train/images_per_second": len(samples.latents) / total}
        known = [g for g in globals_ if g is not None]
        if known:
            metrics["train/global_score_mean"] = sum(known) / len(known)
        scored = [s for s in regions if s is not None]
        if scored:
            metrics["train/region_score_mean"] = sum(scored) / len(scored)
        metrics.update({f"time/{name}_share": value / total for name, value in timing.items()})
        self.log_dict({k: float(v) for k, v in metrics.items()}, batch_size=len(samples.latents))
        # for RewardGridCallback; without the trajectory, which would otherwise stay held through the next step
        self.last_samples = replace(samples, trajectory=None)

    def _evaluate(self, prompts: list[Prompt], batch_idx: int, stage: str) -> Candidates:
        """Self-reward of fresh rollouts (global score and mean token reward), seeded per batch."""
        samples, _ = self.rollout_and_score(prompts, 10**9 + batch_idx)
        kind = self.scoring.score_kind
        globals_ = [r.global_scores.get(kind) for r in samples.records if r.global_scores.get(kind) is not None]
        if globals_:
            self.log(f"{stage}/global_score", sum(globals_) / len(globals_), batch_size=len(globals_),
                     sync_dist=True)
        rewards = torch.cat([m.flatten() for m in samples.reward_maps])
        self.log(f"{stage}/reward_mean", rewards.mean(), batch_size=len(samples.latents), sync_dist=True)
        return samples

    def validation_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        self._evaluate(prompts, batch_idx, "val")

    def test_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        self._evaluate(prompts, batch_idx, "test")

    def predict_step(self, prompts: list[Prompt], batch_idx: int) -> list[RewardRecord]:
        """Candidates for the prompts, judged: their reward records."""
        return self.rollout_and_score(prompts, 10**9 + batch_idx)[0].records

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["srum"] = {"skipped_steps": self.skipped_steps, "checkpoint": str(self.checkpoint)}
        if self.lora is not None:
            checkpoint["srum"]["lora_scale"] = self.lora.alpha / self.lora.rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("srum", {})
        if ("lora_scale" in saved) != (self.lora is not None):
            made, run = ("a LoRA run", "without") if "lora_scale" in saved else ("a run without LoRA", "with")
            raise ValueError(f"ckpt_path: the checkpoint was written by {made}; expected the same model.lora "
                             f"setting, got a run {run} it")
        self.skipped_steps = int(saved.get("skipped_steps", 0))


