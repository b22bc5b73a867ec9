"""Fidelity of inference to the official BAGEL code: case c (text to image with KV cache, text CFG, interval
and global renorm) and case d (image understanding, greedy decoding) of the recorded fixture."""

from __future__ import annotations

import pytest
import torch

from srum.generation.context import ContextBatch
from srum.generation.image import GuidanceContexts, sample_latent_tokens, tokens_to_latents
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig, generate_text
from srum.model.checkpoint import load_checkpoint
from srum.model.tokenizer import SpecialTokens

from .official_fixture import OfficialFixture, relative_error

ACTIVATION_TOLERANCE = 1e-4  # the fixture's bound for activations, velocities, latents and decoded images


@pytest.fixture(scope="module")
def fixture(shared_dir) -> OfficialFixture:
    return OfficialFixture(shared_dir / "reference" / "fixtures" / "bagel-tiny-public")


@pytest.fixture(scope="module")
def checkpoint(fixture):
    loaded = load_checkpoint(fixture.folder, config=fixture.config)
    loaded.model.eval()
    return loaded


def test_text_to_image_matches_official(fixture, checkpoint):
    cases, meta = fixture.cases, fixture.meta["c"]
    kwargs = meta["kwargs"]
    config = SamplerConfig(num_timesteps=kwargs["num_timesteps"], timestep_shift=kwargs["timestep_shift"],
                           cfg_text_scale=kwargs["cfg_text_scale"], cfg_img_scale=kwargs["cfg_img_scale"],
                           cfg_interval=tuple(kwargs["cfg_interval"]), cfg_renorm_type=kwargs["cfg_renorm_type"],
                           cfg_renorm_min=kwargs["cfg_renorm_min"])
    cond = ContextBatch(checkpoint.model, SpecialTokens(**fixture.special_token_ids), batch_size=1)
    text_uncond = cond.fork()
    cond.add_text([meta["prompt_ids"]])
    height, width = meta["image_shape_HW"]
    downsample = fixture.config.latent_downsample
    grids = [(height // downsample, width // downsample)]

    steps = []
    tokens = sample_latent_tokens(GuidanceContexts(cond, text_uncond), grids, cases["c.in.latent.packed_init_noises"],
                                  config, on_step=steps.append)

    assert [step.t for step in steps] == pytest.approx(cases["c.steps.t"].tolist(), abs=1e-7)
    for k, step in enumerate(steps):
        assert relative_error(step.x_t, cases["c.steps.x_t"][k]) <= ACTIVATION_TOLERANCE, k
        assert relative_error(step.v_cond, cases["c.steps.v_cond"][k]) <= ACTIVATION_TOLERANCE, k
        assert relative_error(step.v_text_uncond, cases["c.steps.v_uncond_text"][k]) <= ACTIVATION_TOLERANCE, k
        assert relative_error(step.velocity, cases["c.steps.v_final"][k]) <= ACTIVATION_TOLERANCE, k
    assert relative_error(tokens, cases["c.out.final_latent"]) <= ACTIVATION_TOLERANCE
    (latent,) = tokens_to_latents(tokens, grids, fixture.config.latent_patch_size)
    assert relative_error(latent, cases["c.out.final_latent_image"][0]) <= ACTIVATION_TOLERANCE
    with torch.no_grad():
        decoded = checkpoint.autoencoder.decode(latent[None])
    assert relative_error(decoded, cases["c.out.decoded"]) <= ACTIVATION_TOLERANCE


def test_greedy_understanding_matches_official(fixture, checkpoint):
    cases, meta = fixture.cases, fixture.meta["d"]
    context = ContextBatch(checkpoint.model, SpecialTokens(**fixture.special_token_ids), batch_size=1)
    context.add_vit_images([cases["d.in.vit_image"]])
    context.add_text([meta["question_ids"]])
    cached = (context.cache.lengths.clone(), context.cache.positions.clone())
    logits = []
    answers = generate_text(context, DecodingConfig(max_new_tokens=meta["max_length"] - 1), on_logits=logits.append)

    assert answers == [meta["generated"][1:]]
    recorded = cases["d.out.step_logits"]
    for k, step_logits in enumerate(logits):
        assert relative_error(step_logits[0], recorded[k]) <= ACTIVATION_TOLERANCE, k
    # decoding ran on a copy: the context itself is as the prefills left it
    assert torch.equal(context.cache.lengths, cached[0]) and torch.equal(context.cache.positions, cached[1])
