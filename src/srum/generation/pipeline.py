"""The public face of inference: generate images for prompts, answer questions about images, score candidate
answers. Plain PyTorch, usable from a notebook."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from srum.generation.context import ContextBatch
from srum.generation.image import (
    DenoisingStep,
    GuidanceContexts,
    StochasticSteps,
    initial_noise,
    sample_latent_tokens,
    tokens_to_latents,
)
from srum.generation.sampler import SamplerConfig
from srum.generation.sde import Trajectory
from srum.generation.text import DecodingConfig, candidate_logprobs, generate_text
from srum.model.autoencoder import to_uint8_images
from srum.model.bagel import Bagel
from srum.model.checkpoint import WeightsChoice, load_checkpoint
from srum.model.config import ViTConfig
from srum.model.tokenizer import SpecialTokens, load_tokenizer

# Think-mode system instructions (srum's wording of BAGEL's two instructions).
THINK_BEFORE_IMAGE = ("Before drawing, plan the picture inside <think> </think> tags: the objects, their "
                      "attributes, counts and positions. Then produce the image.")
THINK_BEFORE_ANSWER = ("Reason step by step inside <think> </think> tags about what the image shows and what is "
                       "asked. Then give the answer after the closing tag.")
THINK_END = "</think>"


@dataclass
class GeneratedImages:
    images: list[Tensor]
    """Per image, uint8 pixels (H, W, 3)."""
    latents: list[Tensor]
    """Per image, the sampled latent (C, H / ae_factor, W / ae_factor)."""
    plans: list[str] = field(default_factory=list)
    """Per image, the think-mode plan (empty without think)."""
    trajectory: Trajectory | None = None
    """The steps taken, packed over the images (SDE sampling only)."""


def vit_transform(vit: ViTConfig) -> tuple[int, int, int]:
    """(patch, max_side, min_side) of the understanding transform: BAGEL's 14, 980, 224, or the encoder's own
    image size as the bound for encoders of small images."""
    return vit.patch_size, vit.image_size, min(224, vit.image_size)


def vit_size(height: int, width: int, patch: int, max_side: int, min_side: int = 224,
             max_pixels: int = 14 * 14 * 9 * 1024) -> tuple[int, int]:
    """The (height, width) BAGEL's understanding transform gives an image: the long side at most ``max_side``,
    the short side at least ``min_side``, sides multiples of ``patch``."""
    scale = max(min(max_side / max(height, width), 1.0), min_side / min(height, width))
    sides = [max(patch, round(side * scale / patch) * patch) for side in (height, width)]
    if sides[0] * sides[1] > max_pixels:  # the official transform rescales by the area ratio here
        ratio = max_pixels / (sides[0] * sides[1])
        sides = [max(patch, round(side * ratio / patch) * patch) for side in sides]
    capped = [min(side, max_side // patch * patch) for side in sides]
    return capped[0], capped[1]


def resize_for_vit(image: Tensor, patch: int, max_side: int, min_side: int = 224) -> Tensor:
    """An image (3, H, W) in [-1, 1] resized to ``vit_size``, bicubic with antialiasing."""
    size = vit_size(*image.shape[-2:], patch, max_side, min_side)
    if size == tuple(image.shape[-2:]):
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp(-1, 1).to(image.dtype)


class Pipeline:
    """A loaded unified model with its autoencoder and tokenizer."""

    def __init__(self, model: Bagel, autoencoder: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 special: SpecialTokens) -> None:
        self.model, self.autoencoder = model.eval(), autoencoder.eval()
        self.tokenizer, self.special = tokenizer, special

    @classmethod
    def from_checkpoint(cls, folder: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", weights: WeightsChoice = "auto") -> Pipeline:
        checkpoint = load_checkpoint(folder, dtype=dtype, device=device, weights=weights)
        tokenizer, special = load_tokenizer(folder)
        return cls(checkpoint.model, checkpoint.autoencoder, tokenizer, special)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.lm_head.weight.device

    @property
    def vit_transform(self) -> tuple[int, int, int]:
        return vit_transform(self.model.config.vit)

    def vit_frame(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees an image of this size at."""
        return vit_size(height, width, *self.vit_transform)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _contexts(self, batch_size: int) -> ContextBatch:
        return ContextBatch(self.model, self.special, batch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        factor = self.model.config.latent_downsample
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width}: expected sides that are multiples of {factor}")
        return height // factor, width // factor

    def prompt_contexts(self, prompts: list[str], sampler: SamplerConfig, think: bool = False,
                        decoding: DecodingConfig | None = None, generator: torch.Generator | None = None,
                        ) -> tuple[GuidanceContexts, list[str]]:
        """The three guidance contexts of text-to-image, BAGEL's way, and the think-mode plans.

        conditional = [instruction, prompt, plan]; text-unconditional = [instruction] (what preceded the prompt);
        image-unconditional = [instruction, prompt]. Without think there is no instruction and no plan.
        """
        cond = self._contexts(len(prompts))
        if think:
            cond.add_text([self.encode(THINK_BEFORE_IMAGE)] * len(prompts))
        text_uncond = cond.fork() if sampler.cfg_text_scale > 1.0 else None
        cond.add_text([self.encode(prompt) for prompt in prompts])
        image_uncond = cond.fork() if sampler.cfg_img_scale > 1.0 else None
        plans: list[str] = []
        if think:
            plan_ids = generate_text(cond, decoding or DecodingConfig(max_new_tokens=1000), generator)
            cond.add_text(plan_ids)
            plans = [self.decode(ids) for ids in plan_ids]
        return GuidanceContexts(cond, text_uncond, image_uncond), plans

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: SamplerConfig | None = None,
                 height: int = 1024, width: int = 1024, think: bool = False,
                 decoding: DecodingConfig | None = None, noise_level: float | None = None) -> GeneratedImages:
        """One image per prompt, image i drawn from a noise generator seeded ``seeds[i]``: the same seed gives
        the same image whatever the batch. Repeat a prompt to get several images of it. With ``noise_level`` the
        sampler runs as an SDE (``srum.generation.sde``) and the trajectory is returned."""
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        sampler = sampler or SamplerConfig()
        grids = [self.grid(height, width)] * len(prompts)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        contexts, plans = self.prompt_contexts(prompts, sampler, think, decoding, generators[0] if think else None)
        noise = initial_noise(grids, self.model.config.latent_channels, generators)
        steps: list[DenoisingStep] = []
        stochastic = None if noise_level is None else StochasticSteps(noise_level, generators)
        tokens = sample_latent_tokens(contexts, grids, noise, sampler, steps.append if stochastic else None,
                                      stochastic)
        latents = tokens_to_latents(tokens, grids, self.model.config.latent_patch_size)
        ae_dtype = next(iter(self.autoencoder.parameters()), tokens).dtype
        decoded = self.autoencoder.decode(torch.stack(latents).to(ae_dtype))  # (B, 3, H, W)
        images = list(to_uint8_images(decoded).cpu())
        trajectory = None if stochastic is None else Trajectory(
            [(step.t, step.t_next) for step in steps], torch.stack([step.x_t for step in steps]),
            torch.stack([step.x_next for step in steps]), torch.stack([step.log_prob for step in steps]), noise_level)
        return GeneratedImages(images=images, latents=[latent.cpu() for latent in latents], plans=plans,
                               trajectory=trajectory)

    def _image_contexts(self, images: list[Tensor], questions: list[str], think: bool) -> ContextBatch:
        contexts = self._contexts(len(images))
        if think:
            contexts.add_text([self.encode(THINK_BEFORE_ANSWER)] * len(images))
        contexts.add_vit_images([resize_for_vit(image.to(self.device), *self.vit_transform) for image in images])
        contexts.add_text([self.encode(question) for question in questions])
        return contexts

    @torch.no_grad()
    def answer(self, images: list[Tensor], questions: list[str], decoding: DecodingConfig | None = None,
               think: bool = False, generator: torch.Generator | None = None) -> list[str]:
        """Answer a question about each image ((3, H, W) in [-1, 1]); with think, the text after ``</think>``."""
        contexts = self._image_contexts(images, questions, think)
        answers = [self.decode(ids) for ids in generate_text(contexts, decoding or DecodingConfig(), generator)]
        return [answer.rsplit(THINK_END, 1)[-1].strip() if think else answer.strip() for answer in answers]

    @torch.no_grad()
    def complete(self, texts: list[str], decoding: DecodingConfig | None = None) -> list[str]:
        """Answer each text with text alone (no image): greedy by default."""
        contexts = self._contexts(len(texts))
        contexts.add_text([self.encode(text) for text in texts])
        return [self.decode(ids).strip() for ids in generate_text(contexts, decoding or DecodingConfig())]

    @torch.no_grad()
    def score(self, images: list[Tensor], questions: list[str], candidates: list[list[str]]) -> list[Tensor]:
        """Log-probability of each candidate answer to each question about each image, one (K,) tensor per
        image, from one teacher-forced pass (the basis of probability-weighted scoring)."""
        contexts = self._image_contexts(images, questions, think=False)
        tokenized = [[self.encode(option) for option in options] for options in candidates]
        return candidate_logprobs(contexts, tokenized)

