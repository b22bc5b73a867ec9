"""Autoencoders: official FLUX parity and names, posterior sampling, the pixel shuffle, pixel conversion."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srum.model.autoencoder import (
    FluxAutoEncoder,
    PixelShuffleAutoEncoder,
    build_autoencoder,
    to_uint8_images,
)
from srum.model.config import AEConfig, BagelConfig

# The fixture's own bound for float32 activations and decoded images (cases.md, "Tolerances").
REL_TOL = 1e-4


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference file {path} not found")
    return path


@pytest.fixture(scope="module")
def tiny_public(shared_dir: Path) -> Path:
    return _require(shared_dir / "reference" / "fixtures" / "bagel-tiny-public")


def _relative_error(impl: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|impl - ref| / max|ref|``, the fixture's metric."""
    assert impl.shape == ref.shape, f"shape {tuple(impl.shape)} != reference {tuple(ref.shape)}"
    return ((impl - ref).abs().max() / ref.abs().max()).item()


def _small_flux_config() -> AEConfig:
    return AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def _pixel_shuffle_config(factor: int, scale: float = 1.0, shift: float = 0.0) -> AEConfig:
    return AEConfig(kind="pixel_shuffle", in_channels=3, z_channels=3 * factor**2, pixel_shuffle_factor=factor,
                    scale_factor=scale, shift_factor=shift)


# --- FLUX autoencoder against the official checkpoint layout and code -------------------------------------


def test_flux_state_dict_names_and_shapes_match_official(shared_dir: Path):
    tsv = _require(shared_dir / "reference" / "flux-ae-params.tsv")
    expected = {}
    for line in tsv.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split("\t")[:2]
        expected[name] = tuple(int(size) for size in shape.split("x"))
    assert expected, f"{tsv} lists no tensors"

    with torch.device("meta"):
        model = FluxAutoEncoder(AEConfig())
    actual = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}

    assert sorted(set(expected) - set(actual)) == [], "missing from srum"
    assert sorted(set(actual) - set(expected)) == [], "not in the official checkpoint"
    wrong = {name: (actual[name], shape) for name, shape in expected.items() if actual[name] != shape}
    assert wrong == {}, "(srum, official) shapes differ"
    assert model.downsample == 8 and model.z_channels == 16


def test_flux_matches_official_fixture(tiny_public: Path):
    """Case b (moments, mean-mode latents, decode) and case c's final decode, from the official code."""
    fixture_config = json.loads(_require(tiny_public / "fixture_config.json").read_text())
    params = fixture_config["ae_params"]
    # ``downsample`` and ``resolution`` are unused by the official code; ``out_ch`` is tied to ``in_channels``.
    assert params["out_ch"] == params["in_channels"]
    fields = {field.name for field in dataclasses.fields(AEConfig)}
    config = AEConfig(kind="flux", **{key: value for key, value in params.items() if key in fields})
    model = FluxAutoEncoder(config)
    model.load_state_dict(load_file(_require(tiny_public / "ae.safetensors")), strict=True)
    assert model.downsample == fixture_config["ae_real_downsample"]

    cases = load_file(_require(tiny_public / "cases.safetensors"))
    image = cases["b.image"]
    with torch.no_grad():
        mean, logvar = model.moments(image)
        z = model.encode(image, sample=False)
        decoded = model.decode(cases["b.z"])
        generated = model.decode(cases["c.out.final_latent_image"])  # case c's last step, decoded

    assert _relative_error(torch.cat([mean, logvar], dim=1), cases["b.encoder_out"]) <= REL_TOL
    assert _relative_error(z, cases["b.z"]) <= REL_TOL
    assert _relative_error(decoded, cases["b.decoded"]) <= REL_TOL
    assert _relative_error(generated, cases["c.out.decoded"]) <= REL_TOL


def test_flux_sample_mode_draws_from_the_posterior():
    model = FluxAutoEncoder(_small_flux_config())
    images = torch.rand(2, 3, 6, 10) * 2 - 1
    config = model.config
    with torch.no_grad():
        mean, logvar = model.moments(images)
        sampled = model.encode(images, generator=torch.Generator().manual_seed(5))
        again = model.encode(images, generator=torch.Generator().manual_seed(5))
        other_seed = model.encode(images, generator=torch.Generator().manual_seed(6))
        mean_mode = model.encode(images, sample=False)

    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    expected = config.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - config.shift_factor)
    assert sampled.shape == (2, config.z_channels, 3, 5)
    torch.testing.assert_close(sampled, expected)
    torch.testing.assert_close(mean_mode, config.scale_factor * (mean - config.shift_factor))
    assert torch.equal(sampled, again)
    assert not torch.allclose(sampled, other_seed)
    assert not torch.allclose(sampled, mean_mode)


def test_flux_rejects_bad_shapes():
    model = FluxAutoEncoder(_small_flux_config())
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 6, 5))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="ae.kind"):
        FluxAutoEncoder(_pixel_shuffle_config(2))


# --- pixel-shuffle autoencoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3])
def test_pixel_shuffle_round_trip_is_exact(factor: int):
    model = PixelShuffleAutoEncoder(_pixel_shuffle_config(factor))
    images = torch.randn(2, 3, factor * 7, factor * 5)
    latents = model.encode(images, generator=torch.Generator().manual_seed(1), sample=True)
    assert latents.shape == (2, model.z_channels, 7, 5)
    assert torch.equal(model.decode(latents), images)


def test_pixel_shuffle_round_trip_with_scale_and_shift():
    model = PixelShuffleAutoEncoder(_pixel_shuffle_config(2, scale=0.3611, shift=0.1159))
    images = torch.rand(1, 3, 6, 10) * 2 - 1
    torch.testing.assert_close(model.decode(model.encode(images)), images)


def test_pixel_shuffle_latent_layout():
    """Channel ``c*f*f + p*f + q`` of latent pixel (i, j) is image channel c at pixel (f*i + p, f*j + q)."""
    factor, scale, shift = 2, 0.5, 0.25
    model = PixelShuffleAutoEncoder(_pixel_shuffle_config(factor, scale, shift))
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    latents = model.encode(images)

    # One element by hand: batch 1, c=2, i=1, j=2, p=1, q=0 -> channel 2*4 + 1*2 + 0 = 10, pixel (3, 4).
    assert latents[1, 10, 1, 2].item() == scale * (images[1, 2, 3, 4].item() - shift)
    expected = torch.empty_like(latents)
    for c in range(3):
        for p in range(factor):
            for q in range(factor):
                expected[:, c * factor * factor + p * factor + q] = images[:, c, p::factor, q::factor]
    assert torch.equal(latents, scale * (expected - shift))


def test_pixel_shuffle_is_weight_free_and_deterministic():
    model = PixelShuffleAutoEncoder(_pixel_shuffle_config(2))
    assert list(model.state_dict()) == []
    images = torch.randn(1, 3, 4, 4)
    assert torch.equal(model.encode(images, sample=True), model.encode(images, sample=False))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 5, 4))


# --- construction and pixel conversion ----------------------------------------------------------------------


def test_build_autoencoder_dispatches_on_kind():
    tiny = build_autoencoder(BagelConfig.from_name("tiny").ae)
    assert isinstance(tiny, PixelShuffleAutoEncoder)
    assert tiny.downsample == 2 and tiny.z_channels == 12
    assert isinstance(build_autoencoder(_small_flux_config()), FluxAutoEncoder)
    with pytest.raises(ValueError, match="ae.kind"):
        build_autoencoder(AEConfig(kind="vqgan"))  # type: ignore[arg-type]


def test_to_uint8_images_truncates_and_moves_channels_last():
    # (B=1, C=3, H=1, W=2); channel 0: -1, 1; channel 1: 0, 2 (clamped); channel 2: -3 (clamped), 0.999.
    images = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[-3.0, 0.999]]]])
    pixels = to_uint8_images(images)
    assert pixels.dtype == torch.uint8
    # 0 -> 127.5 -> 127 and 0.999 -> 254.87 -> 254: truncation, where rounding would give 128 and 255.
    assert pixels.tolist() == [[[[0, 127, 0], [255, 255, 254]]]]
