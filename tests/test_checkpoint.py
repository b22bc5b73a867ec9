"""Checkpoint folders: save -> load is bitwise, official folders load as they are, broken ones say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from srum.cli import main
from srum.model.build import build_random
from srum.model.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from srum.model.config import AEConfig, BagelConfig
from srum.model.tokenizer import load_tokenizer


@pytest.fixture
def config() -> BagelConfig:
    return BagelConfig.from_name("tiny")


@pytest.fixture
def saved(tmp_path, config):
    model = build_random(config, seed=3)
    save_checkpoint(tmp_path / "ckpt", model)
    return tmp_path / "ckpt", model


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_save_then_load_is_bitwise(saved, config):
    folder, model = saved
    loaded = load_checkpoint(folder)
    assert loaded.config == config
    _assert_bitwise_equal(loaded.model.state_dict(), model.state_dict())
    assert all(not t.is_meta for t in loaded.model.state_dict().values())
    rotary = loaded.model.language_model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, model.language_model.model.rotary_emb.inv_freq)


def test_flux_autoencoder_round_trips(tmp_path, config):
    from srum.model.autoencoder import build_autoencoder

    config = BagelConfig(llm=config.llm, vit=config.vit, max_latent_size=config.max_latent_size,
                         ae=AEConfig(ch=32, ch_mult=(1, 2), z_channels=4))
    autoencoder = build_autoencoder(config.ae)
    save_checkpoint(tmp_path, build_random(config, seed=0), autoencoder)
    loaded = load_checkpoint(tmp_path)
    _assert_bitwise_equal(loaded.autoencoder.state_dict(), autoencoder.state_dict())
    assert not any(p.requires_grad for p in loaded.autoencoder.parameters())


def test_bf16_choice(saved):
    folder, model = saved
    loaded = load_checkpoint(folder, dtype=torch.bfloat16)
    assert loaded.model.language_model.lm_head.weight.dtype == torch.bfloat16
    expected = model.language_model.lm_head.weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.language_model.lm_head.weight, expected)


def test_sincos_tables_may_be_absent_as_the_official_loader_drops_them(saved):
    folder, model = saved
    weights = load_file(folder / "ema.safetensors")
    del weights["latent_pos_embed.pos_embed"], weights["vit_pos_embed.pos_embed"]
    save_file(weights, folder / "ema.safetensors")
    _assert_bitwise_equal(load_checkpoint(folder).model.state_dict(), model.state_dict())


@pytest.mark.parametrize("damage, message", [
    (lambda w: w.pop("language_model.lm_head.weight"), "missing: language_model.lm_head.weight"),
    (lambda w: w.__setitem__("extra.weight", torch.zeros(2)), "unexpected: extra.weight"),
    (lambda w: w.__setitem__("llm2vae.bias", torch.zeros(5)), "mis-shaped: llm2vae.bias [5]"),
])
def test_mismatched_tensors_are_all_named_in_one_error(saved, damage, message):
    folder, _ = saved
    weights = load_file(folder / "ema.safetensors")
    damage(weights)
    save_file(weights, folder / "ema.safetensors")
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        load_checkpoint(folder)
    assert str(folder / "ema.safetensors") in str(error.value)


def test_several_problems_are_reported_together(saved):
    folder, _ = saved
    weights = load_file(folder / "ema.safetensors")
    weights.pop("connector.fc1.bias")
    weights["vae2llm.bias"] = torch.zeros(3)
    save_file(weights, folder / "ema.safetensors")
    with pytest.raises(CheckpointError, match="missing: connector.fc1.bias; mis-shaped: vae2llm.bias"):
        load_checkpoint(folder)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder: expected llm_config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "absent")


def test_config_without_weights(saved):
    folder, _ = saved
    (folder / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="expected ema.safetensors or model.safetensors"):
        load_checkpoint(folder)


def test_corrupt_files_name_the_file(saved):
    folder, _ = saved
    (folder / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="ema.safetensors: not a readable safetensors file"):
        load_checkpoint(folder)
    (folder / "llm_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="llm_config.json: not valid JSON"):
        load_checkpoint(folder)


def test_llm_config_missing_a_field_names_it(saved):
    folder, _ = saved
    data = json.loads((folder / "llm_config.json").read_text())
    del data["hidden_size"]
    (folder / "llm_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="llm_config.json: missing field.*hidden_size"):
        read_config(folder)


def test_model_weights_can_be_chosen(saved):
    folder, model = saved
    (folder / "ema.safetensors").rename(folder / "model.safetensors")
    assert load_checkpoint(folder).weights_file.name == "model.safetensors"
    with pytest.raises(CheckpointError, match="ema.safetensors: missing weights file"):
        load_checkpoint(folder, weights="ema")


def test_model_init_writes_a_loadable_folder_with_tokenizer(tmp_path):
    main(["model", "init", "--preset", "tiny", "--out", str(tmp_path), "--seed", "4"])
    loaded = load_checkpoint(tmp_path)
    again = build_random(BagelConfig.from_name("tiny"), seed=4)
    _assert_bitwise_equal(loaded.model.state_dict(), again.state_dict())
    tokenizer, special = load_tokenizer(tmp_path)
    assert max(vars(special).values()) < loaded.config.llm.vocab_size
    assert len(tokenizer) <= loaded.config.llm.vocab_size


def test_model_init_refuses_the_7b_preset(tmp_path):
    with pytest.raises(SystemExit, match="model init is for small presets only"):
        main(["model", "init", "--preset", "bagel-7b-mot", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_official_fixture_loads_as_it_is(shared_dir):
    from .official_fixture import OfficialFixture

    fixture = OfficialFixture(shared_dir / "reference" / "fixtures" / "bagel-tiny-public")
    loaded = load_checkpoint(fixture.folder, config=fixture.config)
    stored = load_file(fixture.folder / "ema.safetensors")
    _assert_bitwise_equal(loaded.model.state_dict(), stored)
