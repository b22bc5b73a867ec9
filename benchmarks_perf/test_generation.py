"""Image generation with KV-cached contexts, ``tiny`` preset (random weights, fp32, CPU).

Two comparisons, one pytest-benchmark group each:

- ``batched-vs-loop``: text-to-image for 16 prompts as one batch of contexts versus a loop of 16 single-prompt
  calls doing the same work. One round = build the contexts (cond prefilled with the prompts, text-uncond forked
  before the prompt, as ``Pipeline.prompt_contexts`` does without think) + ``sample_latent_tokens`` with text CFG.
  The autoencoder decode is left out (``tiny``'s pixel shuffle is free). Throughput (images/s) goes in
  ``extra_info``. ``test_batched_matches_loop`` checks both produce the same latents.
- ``prompt-length``: one denoising model call, ``ContextBatch.velocity(query, x_t, t)``, against a cached prompt
  of 16 versus 256 tokens, at batch 1 and batch 4 (one group per batch size). The prompt is prefilled once,
  outside the timed region: the cached prefix is only read, so a step should cost about the same.

Run (see benchmarks_perf/README.md)::

    python -m pytest benchmarks_perf/test_generation.py --benchmark-enable --benchmark-columns=min,mean,median,rounds
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from srum.generation.context import ContextBatch
from srum.generation.image import GuidanceContexts, initial_noise, sample_latent_tokens
from srum.generation.sampler import SamplerConfig
from srum.model.bagel import Bagel
from srum.model.build import build_random
from srum.model.config import BagelConfig
from srum.model.synthetic import special_tokens_for
from srum.model.tokenizer import SpecialTokens

PRESET = "tiny"
NUM_PROMPTS = 16
PROMPT_LENGTHS = (6, 12)
"""Prompt lengths (ids, before ``<|im_start|>``/``<|im_end|>``) are drawn uniformly from this closed range."""
GRID = (8, 8)
"""Latent tokens per image (rows, cols): a 32x32-pixel image at ``tiny``'s latent downsample of 4."""
# BAGEL's text-to-image recipe (shift 3, guidance on (0.4, 1], global renorm) at few steps: 9 Euler steps, 8 of
# them guided, so 17 model calls per generation.
SAMPLER = SamplerConfig(num_timesteps=10, cfg_text_scale=4.0)
PROMPT_SEED = 0
LLM2VAE_SEED = 2
# Warm tiny generation on 2 idle cores: about 0.13-0.2 s batched and 0.7-1 s looped per round, so fixed rounds keep
# the file well under a minute. The warm-up round absorbs first-call costs (allocator, kernel choice).
BATCHED_ROUNDS, LOOP_ROUNDS = 20, 8

STEP_PROMPT_TOKENS = (16, 256)
STEP_BATCH_SIZES = (1, 4)
STEP_T = 0.8
"""A guided flow time; the cost of a model call does not depend on it."""
STEP_ROUNDS, STEP_WARMUP_ROUNDS = 100, 10


def _model(config: BagelConfig) -> Bagel:
    model = build_random(config, seed=0).eval()
    # ``build_random`` leaves llm2vae zero (v = 0 everywhere), which would make sampling and the check vacuous.
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(LLM2VAE_SEED))
    return model


class Setup:
    """The model, 16 random prompts, each image's initial noise, and the sampler every variant shares."""

    def __init__(self) -> None:
        self.config = BagelConfig.from_name(PRESET)
        self.special: SpecialTokens = special_tokens_for(self.config)
        self.model = _model(self.config)
        generator = torch.Generator().manual_seed(PROMPT_SEED)
        ordinary = self.config.llm.vocab_size - 4  # special ids sit at the top of the vocabulary
        low, high = PROMPT_LENGTHS
        self.prompts = [torch.randint(0, ordinary, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                                      generator=generator).tolist() for _ in range(NUM_PROMPTS)]
        self.grids = [GRID] * NUM_PROMPTS
        self.tokens_per_image = GRID[0] * GRID[1]
        # One generator per image (as ``Pipeline.generate`` does), so the loop can slice the same noise.
        self.noise = initial_noise(self.grids, self.config.latent_channels,
                                   [torch.Generator().manual_seed(i) for i in range(NUM_PROMPTS)])


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def generate(model: Bagel, special: SpecialTokens, prompts: list[list[int]], noise: Tensor) -> Tensor:
    """Latent tokens of one image per prompt, all prompts in one batch of contexts. (N, latent_channels)."""
    cond = ContextBatch(model, special, len(prompts))
    text_uncond = cond.fork()  # the context before the prompt: empty
    cond.add_text(prompts)
    return sample_latent_tokens(GuidanceContexts(cond, text_uncond), [GRID] * len(prompts), noise, SAMPLER)


def generate_batched(setup: Setup) -> Tensor:
    return generate(setup.model, setup.special, setup.prompts, setup.noise)


def generate_loop(setup: Setup) -> Tensor:
    parts = setup.noise.split(setup.tokens_per_image)
    return torch.cat([generate(setup.model, setup.special, [prompt], part)
                      for prompt, part in zip(setup.prompts, parts, strict=True)])


GENERATORS = {"batched": generate_batched, "loop": generate_loop}


def test_batched_matches_loop(setup: Setup) -> None:
    batched, looped = generate_batched(setup), generate_loop(setup)
    assert batched.shape == setup.noise.shape
    # The velocities are not zero: sampling moved every image away from its noise.
    moved = (batched - setup.noise).reshape(NUM_PROMPTS, -1).abs().amax(dim=1)
    assert bool((moved > 0.1).all()), moved
    # Both run the same maths per image: masks hide the batch's cache padding (masked keys get exactly zero
    # weight) and renormalisation is per image. What differs is the shapes of the matmuls and SDPA calls (16
    # images' tokens at once, a cache padded to the longest prompt), which can change fp32 summation order;
    # over 9 Euler steps, with CFG scale 4 amplifying velocity differences, that stays at float32's noise floor:
    # measured max |batched - looped| = 7.2e-7 for |x| up to 4.4 (1 or 2 threads), so torch's default float32
    # tolerances (rtol 1.3e-6, atol 1e-5) hold with >10x headroom and would still catch any real cross-talk.
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_batched_vs_loop(benchmark, setup: Setup, mode: str) -> None:
    benchmark.group = f"{PRESET}-batched-vs-loop-{NUM_PROMPTS}-prompts"
    calls = sum(1 + SAMPLER.guided(t) for t in SAMPLER.timesteps().tolist()[:-1])  # per batch of contexts
    benchmark.extra_info.update(
        mode=mode,
        images=NUM_PROMPTS,
        grid=list(GRID),
        latent_tokens_per_image=setup.tokens_per_image,
        prompt_lens=[len(prompt) for prompt in setup.prompts],
        num_timesteps=SAMPLER.num_timesteps,
        cfg_text_scale=SAMPLER.cfg_text_scale,
        decoder_calls=(1 + calls) * (1 if mode == "batched" else NUM_PROMPTS),  # prefill + velocities
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    rounds = BATCHED_ROUNDS if mode == "batched" else LOOP_ROUNDS
    benchmark.pedantic(GENERATORS[mode], args=(setup,), rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        benchmark.extra_info.update(images_per_s_mean=NUM_PROMPTS / stats.mean,
                                    images_per_s_median=NUM_PROMPTS / stats.median,
                                    images_per_s_best=NUM_PROMPTS / stats.min)


class StepSetup:
    """Contexts prefilled with one prompt each, the denoising query of one image each, and an x_t to feed it."""

    def __init__(self, setup: Setup, prompt_tokens: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(prompt_tokens * 100 + batch_size)
        ordinary = setup.config.llm.vocab_size - 4
        prompts = torch.randint(0, ordinary, (batch_size, prompt_tokens), generator=generator).tolist()
        self.contexts = ContextBatch(setup.model, setup.special, batch_size)
        self.contexts.add_text(prompts)
        grids = [GRID] * batch_size
        self.query = self.contexts.denoising_query(grids)
        self.x_t = torch.randn(batch_size * setup.tokens_per_image, setup.config.latent_channels, generator=generator)
        self.t = torch.full((self.x_t.shape[0],), STEP_T)


@pytest.mark.parametrize("batch_size", STEP_BATCH_SIZES)
@pytest.mark.parametrize("prompt_tokens", STEP_PROMPT_TOKENS)
def test_denoising_step(benchmark, setup: Setup, prompt_tokens: int, batch_size: int) -> None:
    step = StepSetup(setup, prompt_tokens, batch_size)
    benchmark.group = f"{PRESET}-prompt-length-batch-{batch_size}"
    cache = step.contexts.cache
    benchmark.extra_info.update(
        prompt_tokens=prompt_tokens,
        cached_tokens=int(cache.lengths[0]),  # prompt + <|im_start|> + <|im_end|>
        cache_capacity=int(cache.keys[0].shape[1]),
        batch_size=batch_size,
        query_tokens=step.query.sequence_length,  # per batch: latent tokens + 2 markers per image
        latent_tokens=int(step.query.latent_indexes.numel()),
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
    )
    velocity = benchmark.pedantic(step.contexts.velocity, args=(step.query, step.x_t, step.t), rounds=STEP_ROUNDS,
                                  warmup_rounds=STEP_WARMUP_ROUNDS, iterations=1)
    assert velocity.shape == step.x_t.shape
    # Denoising reads the cache without writing it: every round saw the same prefix.
    assert int(cache.lengths.max()) == prompt_tokens + 2
