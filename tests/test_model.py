"""Properties of the packed unified model on random inputs: packing is invisible, noise splits are hidden,
experts receive gradients only from their own tokens, MoT with shared weights is a dense model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from srum.model.bagel import Bagel
from srum.model.build import build_random, init_weights
from srum.model.config import BagelConfig
from srum.model.packing import PackedBatch, VaeImage, pack
from srum.model.synthetic import SampleFactory, special_tokens_for

# float64 throughout: packing changes only summation order, so results agree to rounding.
TOLERANCE = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture
def config() -> BagelConfig:
    return BagelConfig.from_name("tiny")


def _random_model(config: BagelConfig, seed: int = 0) -> Bagel:
    model = build_random(config, seed, dtype=torch.float64)
    with torch.no_grad():  # a zero llm2vae would make every velocity 0 and hide routing mistakes
        torch.nn.init.normal_(model.llm2vae.weight, std=0.1)
    return model


def _double(samples):
    for sample in samples:
        for item in sample:
            for field in dataclasses.fields(item):
                value = getattr(item, field.name)
                if isinstance(value, torch.Tensor):
                    setattr(item, field.name, value.double())
    return samples


def _noise(batch: PackedBatch, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch.latent_tokens.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_packed_forward_equals_each_sample_alone(config):
    model = _random_model(config)
    samples = _double(SampleFactory(config, seed=3).mixed(5))
    special = special_tokens_for(config)
    packed = pack(samples, config, special)
    noise = _noise(packed)
    out = model(packed, noise=noise)

    logits, velocities, latent_offset = [], [], 0
    for sample in samples:
        alone = pack([sample], config, special)
        count = alone.latent_tokens.shape[0]
        result = model(alone, noise=noise[latent_offset:latent_offset + count])
        latent_offset += count
        logits.append(result.logits)
        velocities.append(result.velocity)
    torch.testing.assert_close(out.logits, torch.cat(logits), **TOLERANCE)
    torch.testing.assert_close(out.velocity, torch.cat(velocities), **TOLERANCE)
    assert out.logits.shape[0] > 0 and out.velocity.shape[0] > 0


def test_noise_splits_are_invisible_to_every_other_split(config):
    model = _random_model(config)
    factory = SampleFactory(config, seed=5)
    samples = _double([factory.editing(), factory.text_to_image() + [factory.text(loss=True)]])
    special = special_tokens_for(config)
    batch = pack(samples, config, special)
    noise = _noise(batch)
    hidden = {}
    model.language_model.model.register_forward_hook(lambda _m, _i, out: hidden.setdefault("h", []).append(out))
    model(batch, noise=noise)
    # Change the noised latents' noise only: every token outside noise splits must keep its hidden state.
    noised = (batch.latent_timesteps > 0).nonzero().squeeze(1)
    changed = noise.clone()
    changed[noised] += 1.0
    model(batch, noise=changed)
    before, after = hidden["h"]
    in_noise_split = torch.zeros(batch.sequence_length, dtype=torch.bool)
    start = 0
    for length, mode in zip(batch.layout.split_lens, batch.layout.attn_modes, strict=True):
        in_noise_split[start:start + length] = mode == "noise"
        start += length
    torch.testing.assert_close(before[~in_noise_split], after[~in_noise_split], **TOLERANCE)
    assert not torch.allclose(before[in_noise_split], after[in_noise_split])


def _grad_names(model: Bagel) -> tuple[set[str], set[str]]:
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    untouched = {name for name, _ in model.named_parameters()} - touched
    return touched, untouched


def _is_generation_parameter(name: str) -> bool:
    return "moe_gen" in name or name.split(".")[0] in ("time_embedder", "vae2llm", "llm2vae")


def test_understanding_tokens_train_only_understanding_weights(config):
    model = _random_model(config)
    factory = SampleFactory(config, seed=7)
    batch = pack(_double([factory.understanding(), factory.understanding()]), config, special_tokens_for(config))
    model(batch).ce().sum().backward()
    touched, _ = _grad_names(model)
    assert not {name for name in touched if _is_generation_parameter(name)}
    assert "language_model.model.layers.0.mlp.up_proj.weight" in touched
    assert "vit_model.vision_model.embeddings.patch_embedding.weight" in touched


def test_frozen_understanding_lets_generation_tokens_train_only_generation_weights(config):
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, freeze_und=True))
    model = _random_model(config).train()
    factory = SampleFactory(config, seed=9)
    batch = pack(_double([factory.text_to_image(), factory.editing()]), config, special_tokens_for(config))
    model(batch, noise=_noise(batch)).mse().sum().backward()
    touched, untouched = _grad_names(model)
    assert all(_is_generation_parameter(name) for name in touched), sorted(touched)
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight" in touched
    assert "language_model.model.embed_tokens.weight" in untouched


def test_generation_tokens_reach_understanding_weights_only_through_attention(config):
    """Without freezing, a latent token's loss reaches the understanding expert only via the text keys and
    values it attends to: the understanding MLP of the last layer and ``lm_head`` stay untouched."""
    model = _random_model(config)
    batch = pack(_double([SampleFactory(config, seed=11).text_to_image()]), config, special_tokens_for(config))
    model(batch, noise=_noise(batch)).mse().sum().backward()
    touched, untouched = _grad_names(model)
    last = config.llm.num_hidden_layers - 1
    assert f"language_model.model.layers.{last}.mlp.up_proj.weight" in untouched
    assert "language_model.lm_head.weight" in untouched
    assert "language_model.model.layers.0.self_attn.k_proj.weight" in touched


def test_mot_with_shared_weights_equals_the_dense_model(config):
    dense_config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, layer_module="Qwen2DecoderLayer"))
    dense = _random_model(dense_config)
    mot = Bagel(config).double()
    state = dense.state_dict()
    for name in mot.state_dict():
        state.setdefault(name, state[name.replace("_moe_gen", "")])
    mot.load_state_dict(state, strict=True)
    batch = pack(_double(SampleFactory(config, seed=13).mixed(4)), config, special_tokens_for(config))
    noise = _noise(batch)
    expected, actual = dense(batch, noise=noise), mot(batch, noise=noise)
    torch.testing.assert_close(actual.logits, expected.logits, **TOLERANCE)
    torch.testing.assert_close(actual.velocity, expected.velocity, **TOLERANCE)


def test_position_ids_follow_bagel_rules(config):
    factory = SampleFactory(config, seed=15)
    text, clean, vit, answer, noised = factory.editing()
    batch = pack([[text, clean, vit, answer, noised, VaeImage(clean.latent)]], config, special_tokens_for(config))
    lengths = batch.layout.split_lens
    expected, position = [], 0
    for index, length in enumerate(lengths):
        if batch.layout.attn_modes[index] == "causal":
            expected += list(range(position, position + length))
            position += length
        else:
            expected += [position] * length
            position += 0 if batch.layout.attn_modes[index] == "noise" else 1
    assert batch.position_ids.tolist() == expected
    # the clean copy after a noised image reuses the noised image's position id
    assert batch.position_ids[-1] == batch.position_ids[sum(lengths[:-1]) - 1]


def test_fresh_model_predicts_zero_velocity(config):
    model = init_weights(Bagel(config), seed=0)
    batch = pack(SampleFactory(config, seed=17).mixed(3), config, special_tokens_for(config))
    assert torch.count_nonzero(model(batch).velocity) == 0


def test_clean_prediction_turns_the_predicted_x0_into_the_velocity(config):
    clean = dataclasses.replace(config, prediction="clean", min_flow_time=0.2)
    model = _random_model(clean)
    batch = pack(_double(SampleFactory(clean, seed=5).mixed(4)), clean, special_tokens_for(clean))
    tokens = batch.latent_timesteps.numel()
    batch = dataclasses.replace(batch, latent_timesteps=torch.linspace(0.01, 0.9, tokens, dtype=torch.float64))
    noise = _noise(batch)
    out = model(batch, noise=noise)
    velocity_model = Bagel(dataclasses.replace(clean, prediction="velocity")).double()
    velocity_model.load_state_dict(model.state_dict())
    predicted_x0 = velocity_model(batch, noise=noise).velocity  # the same head read as it is
    x0, t = batch.latent_tokens[out.mse_indexes], batch.latent_timesteps[out.mse_indexes]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise[out.mse_indexes]
    expected = (x_t - predicted_x0) / t.clamp_min(0.2)[:, None]
    torch.testing.assert_close(out.velocity, expected, **TOLERANCE)
    assert (t < 0.2).any() and (t > 0.2).any()  # both sides of the clamp are exercised


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager flex attention on the CPU warns that it is slow
def test_flex_backend_gives_the_sdpa_forward(config):
    model = build_random(config, seed=2).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.llm2vae.weight, std=0.1)
    batch = pack(SampleFactory(config, seed=19).mixed(3), config, special_tokens_for(config))
    noise = torch.randn(batch.latent_tokens.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, flex = model(batch, noise=noise), model(batch, noise=noise, backend="flex")
    # float32 with a different softmax summation order: agreement at float32 rounding of O(1) activations.
    torch.testing.assert_close(flex.logits, reference.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex.velocity, reference.velocity, rtol=1e-5, atol=1e-5)
