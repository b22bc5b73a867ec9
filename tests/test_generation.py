"""Inference against plain recomputation: the KV cache changes nothing, batches equal their samples, the
guidance maths equals a direct reference, the Euler sampler integrates known flows, think mode puts the plan
only in the conditional context."""

from __future__ import annotations

import pytest
import torch

from srum.generation.context import ContextBatch
from srum.generation.image import GuidanceContexts, initial_noise, sample_latent_tokens
from srum.generation.sampler import SamplerConfig, combine_guidance, euler_step
from srum.generation.text import DecodingConfig, candidate_logprobs, generate_text, pick_tokens
from srum.model.build import build_random
from srum.model.config import BagelConfig
from srum.model.packing import Text, VaeImage, pack
from srum.model.patches import patchify
from srum.model.qwen2 import packed_attention_fn
from srum.model.synthetic import special_tokens_for

TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64: the cache changes only the summation order


@pytest.fixture(scope="module")
def config() -> BagelConfig:
    return BagelConfig.from_name("tiny")


@pytest.fixture(scope="module")
def model(config):
    model = build_random(config, seed=0, dtype=torch.float64).eval()
    with torch.no_grad():  # a zero llm2vae would make every velocity 0
        model.llm2vae.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def special(config):
    return special_tokens_for(config)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (int(n),), generator=generator).tolist()
            for n in torch.randint(3, 12, (count,), generator=generator)]


def test_cached_denoising_equals_the_full_sequence(model, special, config):
    prompts, grids = _prompts(3), [(2, 3), (3, 3), (1, 4)]
    contexts = ContextBatch(model, special, 3)
    contexts.add_text(prompts)
    x = torch.randn(sum(r * c for r, c in grids), config.latent_channels, dtype=torch.float64)
    t = torch.full((x.shape[0],), 0.7, dtype=torch.float64)
    cached = contexts.velocity(contexts.denoising_query(grids), x, t)

    patch = config.latent_patch_size
    latents = [torch.zeros(config.ae.z_channels, r * patch, c * patch, dtype=torch.float64) for r, c in grids]
    full = pack([[Text(p), VaeImage(latent, timestep=0.7)] for p, latent in zip(prompts, latents, strict=True)],
                config, special)
    with torch.no_grad():
        hidden = model.hidden_states(full, model.embed(full, x), packed_attention_fn(full.layout))
        recomputed = model.predict_velocity(hidden[full.latent_indexes], x, full.latent_timesteps)
    torch.testing.assert_close(cached, recomputed, **TIGHT)


def test_cached_greedy_decoding_equals_recomputing_every_step(model, special, config):
    prompts = _prompts(2, seed=3)
    contexts = ContextBatch(model, special, 2)
    contexts.add_text(prompts)
    answers = generate_text(contexts, DecodingConfig(max_new_tokens=6))

    for prompt, answer in zip(prompts, answers, strict=True):
        sequence = [special.bos_token_id]
        for _ in range(6):
            # the whole context and the answer so far, one packed causal sample, no cache
            batch = pack([[Text(prompt), Text(sequence, wrap=False)]], config, special)
            with torch.no_grad():
                hidden = model.hidden_states(batch, model.embed(batch, batch.latent_tokens),
                                             packed_attention_fn(batch.layout))
                next_token = int(model.language_model.lm_head(hidden[-1]).argmax())
            if next_token == special.eos_token_id:
                break
            sequence.append(next_token)
        assert answer == sequence[1:]


def test_a_batch_equals_its_samples_one_by_one(model, special, config):
    prompts, grids = _prompts(3, seed=5), [(2, 2), (3, 2), (2, 4)]
    sampler = SamplerConfig(num_timesteps=4, cfg_text_scale=3.0, cfg_interval=(0.0, 1.0))
    generators = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    noise = initial_noise(grids, config.latent_channels, generators).double()

    def run(indexes: list[int]) -> torch.Tensor:
        cond = ContextBatch(model, special, len(indexes))
        uncond = cond.fork()
        cond.add_text([prompts[i] for i in indexes])
        parts = noise.split([r * c for r, c in grids])
        return sample_latent_tokens(GuidanceContexts(cond, uncond), [grids[i] for i in indexes],
                                    torch.cat([parts[i] for i in indexes]), sampler)

    together = run([0, 1, 2])
    torch.testing.assert_close(together, torch.cat([run([i]) for i in range(3)]), rtol=1e-6, atol=1e-6)


def _reference_guidance(v_c, v_t, v_i, config):
    """BAGEL's formulas, written out per image with whole-tensor norms."""
    def renorm(ref, guided, per_token):
        if per_token:
            scale = ref.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
        else:
            scale = ref.norm() / (guided.norm() + 1e-8)
        return guided * scale.clamp(config.cfg_renorm_min, 1.0)

    v1 = v_t + config.cfg_text_scale * (v_c - v_t)
    if config.cfg_renorm_type == "text_channel":
        v1 = renorm(v_c, v1, per_token=True)
        return v_i + config.cfg_img_scale * (v1 - v_i) if v_i is not None else v1
    v2 = v_i + config.cfg_img_scale * (v1 - v_i) if v_i is not None else v1
    return renorm(v_c, v2, per_token=config.cfg_renorm_type == "channel")


@pytest.mark.parametrize("renorm_type", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("renorm_min", [0.0, 0.5])
@pytest.mark.parametrize("image_guidance", [False, True])
def test_guidance_equals_the_plain_reference(renorm_type, renorm_min, image_guidance):
    config = SamplerConfig(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_type=renorm_type,
                           cfg_renorm_min=renorm_min)
    counts = torch.tensor([5, 3, 7])
    generator = torch.Generator().manual_seed(0)
    v_c, v_t, v_i = (torch.randn(int(counts.sum()), 16, generator=generator, dtype=torch.float64) for _ in range(3))
    v_i = v_i if image_guidance else None
    combined = combine_guidance(v_c, v_t, v_i, config, counts)
    expected = torch.cat([_reference_guidance(c, t, i, config) for c, t, i in zip(
        v_c.split(counts.tolist()), v_t.split(counts.tolist()),
        v_i.split(counts.tolist()) if v_i is not None else [None] * 3, strict=True)])
    torch.testing.assert_close(combined, expected, **TIGHT)
    assert combine_guidance(v_c, None, v_i, config, counts) is v_c


def test_sampler_schedule_golden_values():
    config = SamplerConfig()  # T = 50, shift 3, interval (0.4, 1]
    t = config.timesteps()
    assert len(t) == 50 and t[0] == 1.0 and t[-1] == 0.0
    assert sum(config.guided(float(x)) for x in t[:-1]) == 41
    # the official shift of linspace(1, 0, 5) with s = 3, as recorded from the official code
    assert SamplerConfig(num_timesteps=5).timesteps().tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_euler_integrates_flows_with_known_solutions():
    config = SamplerConfig(num_timesteps=13, timestep_shift=2.5)
    t = config.timesteps().double().tolist()
    start = torch.randn(4, 8, dtype=torch.float64)
    constant = torch.randn(4, 8, dtype=torch.float64)
    target = torch.randn(4, 8, dtype=torch.float64)
    x, y = start.clone(), start.clone()
    for t_now, t_next in zip(t[:-1], t[1:], strict=True):
        x = euler_step(x, constant, t_now, t_next)
        # the exact velocity of the straight path from `target` (t = 0) through y (t = t_now)
        y = euler_step(y, (y - target) / t_now, t_now, t_next)
    torch.testing.assert_close(x, start - constant, **TIGHT)  # the steps sum to exactly 1
    torch.testing.assert_close(y, target, **TIGHT)  # Euler is exact on straight flows


def test_think_mode_puts_the_plan_only_in_the_conditional_context(model, special):
    from srum.generation.pipeline import Pipeline

    class IdsTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [int(word) for word in text.split()] if text[0].isdigit() else [7, 8, 9]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    pipeline = Pipeline(model, torch.nn.Identity(), IdsTokenizer(), special)
    sampler = SamplerConfig(cfg_text_scale=4.0, cfg_img_scale=2.0)
    contexts, plans = pipeline.prompt_contexts(["11 12 13"], sampler, think=True,
                                               decoding=DecodingConfig(max_new_tokens=3))
    plan = [int(token) for token in plans[0].split()]
    instruction, prompt = 3 + 2, 3 + 2  # each a segment with its two markers
    assert contexts.text_uncond.cache.lengths.tolist() == [instruction]
    assert contexts.image_uncond.cache.lengths.tolist() == [instruction + prompt]
    assert contexts.cond.cache.lengths.tolist() == [instruction + prompt + len(plan) + 2]

    reference = ContextBatch(model, special, 1)
    reference.add_text([[7, 8, 9]])
    for layer, keys in enumerate(reference.cache.keys):
        torch.testing.assert_close(contexts.text_uncond.cache.keys[layer][:, :instruction], keys[:, :instruction])
    reference.add_text([[11, 12, 13]])
    for layer, keys in enumerate(reference.cache.keys):
        length = instruction + prompt
        torch.testing.assert_close(contexts.image_uncond.cache.keys[layer][:, :length], keys[:, :length])
        torch.testing.assert_close(contexts.cond.cache.keys[layer][:, :length], keys[:, :length])


def test_candidate_logprobs_equal_step_by_step_decoding(model, special):
    contexts = ContextBatch(model, special, 2)
    contexts.add_text(_prompts(2, seed=9))
    candidates = [[[5, 6], [5], [40, 41, 42]], [[300]]]
    scores = candidate_logprobs(contexts, candidates)
    for row, options in enumerate(candidates):
        for k, option in enumerate(options):
            single = contexts.fork(torch.tensor([row]))
            total, token = 0.0, special.bos_token_id
            for target in option:
                logits = single.decode_step(torch.tensor([token]))
                total += float(torch.log_softmax(logits.float(), -1)[0, target])
                token = target
            assert float(scores[row][k]) == pytest.approx(total, abs=1e-5)


def test_top_p_sampling_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    config = DecodingConfig(do_sample=True, top_p=0.8)
    generator = torch.Generator().manual_seed(0)
    picks = {int(pick_tokens(logits, config, generator)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(pick_tokens(logits, DecodingConfig())) == 0


def test_each_context_stops_on_its_own(model, special):
    contexts = ContextBatch(model, special, 2)
    contexts.add_text(_prompts(2, seed=21))
    free = generate_text(contexts, DecodingConfig(max_new_tokens=5))
    stop = free[0][1]  # the second token the first context decodes
    stopped = generate_text(contexts, DecodingConfig(max_new_tokens=5, stop_token_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stopped[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


def test_cached_clean_image_context_equals_the_full_sequence(model, special, config):
    """Editing-style context: a prompt and a clean latent image cached, then a noised image denoised after it."""
    prompt, grid = _prompts(1, seed=31)[0], (2, 3)
    patch = config.latent_patch_size
    generator = torch.Generator().manual_seed(4)
    clean = torch.randn(config.ae.z_channels, 2 * patch, 3 * patch, generator=generator, dtype=torch.float64)
    contexts = ContextBatch(model, special, 1)
    contexts.add_text([prompt])
    contexts.add_vae_images([clean])
    x = torch.randn(6, config.latent_channels, generator=generator, dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    cached = contexts.velocity(contexts.denoising_query([grid]), x, t)

    zeros = torch.zeros_like(clean)
    full = pack([[Text(prompt), VaeImage(clean), VaeImage(zeros, timestep=0.4)]], config, special)
    inputs = torch.cat([patchify(clean, patch), x])  # clean tokens as they are (t = 0), then x_t
    with torch.no_grad():
        hidden = model.hidden_states(full, model.embed(full, inputs), packed_attention_fn(full.layout))
        recomputed = model.predict_velocity(hidden[full.latent_indexes[6:]], x, t)
    torch.testing.assert_close(cached, recomputed, **TIGHT)
