"""Fidelity to the official BAGEL code: the tiny checkpoint and the outputs recorded from it (case a: packed
training forward of a text-to-image sample and an understanding sample)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from srum.model.attention import dense_masks
from srum.model.checkpoint import load_checkpoint
from srum.model.embeddings import sincos_2d_table

from .official_fixture import OfficialFixture, relative_error

ACTIVATION_TOLERANCE = 1e-4  # the fixture's bound for float32 activations (cases.md, "Tolerances")
LOSS_TOLERANCE = 1e-5  # the fixture's bound for scalar losses


@pytest.fixture(scope="module")
def fixture(shared_dir) -> OfficialFixture:
    return OfficialFixture(shared_dir / "reference" / "fixtures" / "bagel-tiny-public")


@pytest.fixture(scope="module")
def checkpoint(fixture):
    return load_checkpoint(fixture.folder, config=fixture.config)


@pytest.fixture(scope="module")
def case_a(fixture):
    return fixture.case_a()


def test_sincos_tables_recompute_the_stored_ones(fixture):
    weights = load_file(fixture.folder / "ema.safetensors")
    config = fixture.config
    for name, grid in (("latent_pos_embed.pos_embed", config.max_latent_size),
                       ("vit_pos_embed.pos_embed", config.vit_max_num_patch_per_side)):
        recomputed = sincos_2d_table(grid, config.llm.hidden_size)
        assert torch.equal(recomputed, weights[name]), name


def test_packing_reproduces_the_official_packed_tensors(fixture, case_a):
    cases, meta = fixture.cases, fixture.meta["a"]
    assert case_a.layout.sample_lens == tuple(meta["sample_lens"])
    assert case_a.layout.split_lens == tuple(meta["split_lens"])
    assert case_a.layout.attn_modes == tuple(meta["attn_modes"])
    for ours, theirs in [
        (case_a.position_ids, "packed_position_ids"), (case_a.text_ids, "packed_text_ids"),
        (case_a.text_indexes, "packed_text_indexes"), (case_a.vit_indexes, "packed_vit_token_indexes"),
        (case_a.vit_position_ids, "packed_vit_position_ids"), (case_a.latent_indexes, "packed_vae_token_indexes"),
        (case_a.latent_position_ids, "packed_latent_position_ids"), (case_a.ce_indexes, "ce_loss_indexes"),
        (case_a.ce_labels, "packed_label_ids"), (case_a.latent_indexes, "mse_loss_indexes"),
    ]:
        assert torch.equal(ours, cases[f"a.in.{theirs}"].long()), theirs
    assert case_a.vit_seqlens == tuple(cases["a.in.vit_token_seqlens"].tolist())
    assert torch.equal(case_a.vit_patches, cases["a.in.packed_vit_tokens"])
    for index, mask in enumerate(dense_masks(case_a.layout)):
        assert torch.equal(mask, cases[f"a.in.nested_attention_masks.{index}"]), index


def test_packed_training_forward_matches_official(fixture, checkpoint, case_a):
    cases, model = fixture.cases, checkpoint.model.eval()
    hidden_states = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: hidden_states.append(out))
             for layer in model.language_model.model.layers]
    with torch.no_grad():
        out = model(case_a, noise=cases["a.in.noise"])
    for hook in hooks:
        hook.remove()

    for index, hidden in enumerate(hidden_states):
        assert relative_error(hidden, cases[f"a.dbg.hidden_after_layer{index}"]) <= ACTIVATION_TOLERANCE, index
    assert relative_error(out.velocity, cases["a.out.pred_velocity"]) <= ACTIVATION_TOLERANCE
    assert relative_error(out.mse(), cases["a.out.mse"]) <= ACTIVATION_TOLERANCE
    assert relative_error(out.logits, cases["a.out.ce_logits"]) <= ACTIVATION_TOLERANCE
    assert relative_error(out.ce(), cases["a.out.ce"]) <= ACTIVATION_TOLERANCE
    mse_loss, ce_loss = out.mse().mean(), out.ce().mean()
    assert relative_error(mse_loss, cases["a.out.mse_loss"]) <= LOSS_TOLERANCE
    assert relative_error(ce_loss, cases["a.out.ce_loss"]) <= LOSS_TOLERANCE
    assert relative_error(out.loss(), cases["a.out.loss"]) <= LOSS_TOLERANCE


def test_vision_encoder_matches_official(fixture, checkpoint, case_a):
    with torch.no_grad():
        vit_out = checkpoint.model.vit_model(case_a.vit_patches, case_a.vit_position_ids, case_a.vit_seqlens)
    assert relative_error(vit_out, fixture.cases["a.dbg.vit_out"]) <= ACTIVATION_TOLERANCE
