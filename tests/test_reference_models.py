"""srum's decoder and vision encoder against independent references, in float64 on random weights.

- the dense decoder against ``transformers.Qwen2ForCausalLM`` (one sample, and two samples packed);
- a MoT decoder whose generation expert copies the understanding expert against the dense decoder (§16.8);
- one attention layer with q/k norms against a hand-written §4 reference;
- the vision encoder against ``transformers.SiglipVisionModel`` (one image, and images packed);
- the conv -> linear patch-embedding conversion against ``F.conv2d`` (§16.5).

Tolerances. Everything runs in float64, but a few steps are float32 by design, identically in srum and in
Hugging Face: RoPE angles (``position_ids.float() * inv_freq.float()``) and the RMSNorm normalisation (§4: "computed
in fp32, cast back"). Two implementations that round at the same places agree to float64 noise (~1e-15). The only
float32 step the two sides do *not* share is Hugging Face's eager softmax (``softmax(..., dtype=float32)``), whose
probabilities carry a relative error of 2**-24 ~ 6e-8. Through two layers of random weights (std 0.2, logits up
to ~7) that grows to ~1.5e-6 on the logits, hence ``FP32_STEP_TOL = 1e-5`` for HF eager. The hand-written §4
reference rounds to float32 at the same steps as srum, but with ``x / sqrt`` where srum (like HF) uses ``x * rsqrt``:
one float32 ulp on the normalised q/k, ~3e-7 on the output, same tolerance. Where no float32 step differs (HF sdpa,
srum against srum) the results agree to ~1e-15 and ``TIGHT_TOL = 1e-10`` applies. Each comparison is paired with
a perturbed weight (or layout) that must break it, so no tolerance is loose enough to pass anything.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from srum.model.attention import PackedLayout, packed_attention
from srum.model.config import LLMConfig, ViTConfig
from srum.model.patches import grid_position_ids, patchify
from srum.model.qwen2 import ExpertRouting, Qwen2ForCausalLM, packed_attention_fn
from srum.model.siglip import SiglipVisionModel, conv_patch_weight_to_linear

transformers = pytest.importorskip("transformers")

FP32_STEP_TOL = 1e-5
TIGHT_TOL = 1e-10

LLM_SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are tiny: on a busy machine, intra-op threads only wait on each other (float64 linears went
    from ~20 us to ~20 ms with 2 threads under load), so each test runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """``atol = rtol = tol`` with the worst error in the message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), f"{what}: max |diff| {err:.3e} > tol {tol:g}"


def assert_differs(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """The perturbation check: the comparison above must be able to fail."""
    assert not torch.allclose(actual, expected, atol=tol, rtol=tol), f"{what}: a perturbed weight went unnoticed"


def randomize_(module: torch.nn.Module, generator: torch.Generator, std: float = 0.2) -> None:
    """Every parameter random (norm weights around 1, everything else around 0), so no weight is a no-op."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * std
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm else noise)


# --- 1. dense decoder vs transformers.Qwen2ForCausalLM -------------------------------------------------------


def _qwen2_pair(attn_implementation: str) -> tuple[Qwen2ForCausalLM, torch.nn.Module]:
    """srum's dense decoder and HF's Qwen2 with the same random weights, copied by name (float64)."""
    torch.set_default_dtype(torch.float64)
    srum = Qwen2ForCausalLM(LLMConfig(**LLM_SIZES, qk_norm=False, layer_module="Qwen2DecoderLayer")).eval()
    hf_config = transformers.Qwen2Config(**LLM_SIZES, tie_word_embeddings=False, attention_dropout=0.0,
                                         use_sliding_window=False, attn_implementation=attn_implementation)
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    hf_state = hf.state_dict()
    srum_state = srum.state_dict()
    assert set(srum_state) == set(hf_state), (
        f"names only in srum: {sorted(set(srum_state) - set(hf_state))}, "
        f"only in HF: {sorted(set(hf_state) - set(srum_state))}")
    randomize_(hf, torch.Generator().manual_seed(1))
    srum.load_state_dict(hf.state_dict(), strict=True)
    for name, tensor in srum.state_dict().items():
        assert tensor.dtype == torch.float64, name
    return srum, hf


def _srum_logits(model: Qwen2ForCausalLM, ids: Tensor, position_ids: Tensor, layout: PackedLayout) -> Tensor:
    embeds = model.model.embed_tokens(ids)
    hidden = model.model(embeds, position_ids=position_ids, routing=ExpertRouting(None, None),
                         attend=packed_attention_fn(layout))
    return model.lm_head(hidden)


@pytest.mark.parametrize("attn_implementation,tol", [("eager", FP32_STEP_TOL), ("sdpa", TIGHT_TOL)])
@torch.no_grad()
def test_dense_decoder_matches_hf_qwen2(attn_implementation: str, tol: float) -> None:
    srum, hf = _qwen2_pair(attn_implementation)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, LLM_SIZES["vocab_size"], (13,), generator=generator)
    length = ids.shape[0]
    layout = PackedLayout((length,), (length,), ("causal",))
    expected = hf(input_ids=ids[None]).logits[0]
    actual = _srum_logits(srum, ids, torch.arange(length), layout)
    assert expected.dtype == actual.dtype == torch.float64
    assert expected.abs().max() > 0.1  # logits of a real size, so the tolerance is not vacuous
    assert_close(actual, expected, tol, f"logits vs HF Qwen2 ({attn_implementation})")

    srum.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-2
    assert_differs(_srum_logits(srum, ids, torch.arange(length), layout), expected, tol, "decoder vs HF")


@pytest.mark.parametrize("attn_implementation,tol", [("eager", FP32_STEP_TOL), ("sdpa", TIGHT_TOL)])
@torch.no_grad()
def test_packed_text_samples_match_hf_run_separately(attn_implementation: str, tol: float) -> None:
    srum, hf = _qwen2_pair(attn_implementation)
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, LLM_SIZES["vocab_size"], (13,), generator=generator)
    second = torch.randint(0, LLM_SIZES["vocab_size"], (7,), generator=generator)
    ids = torch.cat([first, second])
    layout = PackedLayout((13, 7), (13, 7), ("causal", "causal"))
    position_ids = torch.cat([torch.arange(13), torch.arange(7)])
    expected = torch.cat([hf(input_ids=first[None]).logits[0], hf(input_ids=second[None]).logits[0]])
    assert_close(_srum_logits(srum, ids, position_ids, layout), expected, tol, "packed logits vs HF")

    # One causal sequence over both (no sample boundary) must not pass. (Continuing position ids would: RoPE is
    # relative, so a uniform shift of a sample's positions changes nothing beyond float32 angle rounding.)
    merged = PackedLayout((20,), (20,), ("causal",))
    assert_differs(_srum_logits(srum, ids, position_ids, merged), expected, tol, "sample boundary")
    stretched = torch.cat([torch.arange(13), 2 * torch.arange(7)])
    assert_differs(_srum_logits(srum, ids, stretched, layout), expected, tol, "position ids")


# --- 2. MoT with copied experts == dense ---------------------------------------------------------------------


# Two samples, every mode, a noise split followed by text and by a clean image (as in edit/T2I samples).
MIXED = PackedLayout(
    sample_lens=(15, 9),
    split_lens=(4, 5, 3, 3, 2, 4, 3),
    attn_modes=("causal", "full", "noise", "causal", "causal", "noise", "full"),
)


@torch.no_grad()
def test_mot_with_copied_experts_equals_dense() -> None:
    torch.set_default_dtype(torch.float64)
    dense = Qwen2ForCausalLM(LLMConfig(**LLM_SIZES, qk_norm=True, layer_module="Qwen2DecoderLayer")).eval()
    mot = Qwen2ForCausalLM(LLMConfig(**LLM_SIZES, qk_norm=True, layer_module="Qwen2MoTDecoderLayer")).eval()
    randomize_(dense, torch.Generator().manual_seed(4))
    dense_state = dense.state_dict()
    mot_state = mot.state_dict()
    gen_names = {name for name in mot_state if "_moe_gen" in name}
    assert set(mot_state) - gen_names == set(dense_state)
    copied = {name: dense_state[name.replace("_moe_gen", "")] for name in gen_names}
    # Every generation tensor has an understanding twin, and nothing else is generation-only.
    assert len(copied) == len(gen_names) > 0
    mot.load_state_dict({**dense_state, **copied}, strict=True)

    generator = torch.Generator().manual_seed(5)
    length = MIXED.total_len
    embeds = torch.randn(length, LLM_SIZES["hidden_size"], generator=generator)
    position_ids = torch.cat([torch.tensor([0, 1, 2, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5, 6, 7]),
                              torch.tensor([0, 1, 2, 2, 2, 2, 3, 3, 3])])
    expected = dense.model(embeds, position_ids, ExpertRouting(None, None), packed_attention_fn(MIXED))
    routings = {
        "none": torch.empty(0, dtype=torch.long),
        "all": torch.arange(length),
        "image splits": torch.cat([torch.arange(4, 12), torch.arange(17, 24)]),
        **{f"random {i}": torch.randperm(length, generator=generator)[: 1 + i * 5].sort().values for i in range(4)},
    }
    for label, gen in routings.items():
        routing = ExpertRouting.from_gen_indexes(gen, length)
        actual = mot.model(embeds, position_ids, routing, packed_attention_fn(MIXED))
        assert_close(actual, expected, TIGHT_TOL, f"MoT with copied experts, routing {label}")

    # A differing generation expert must show up exactly where there are generation tokens.
    mot.model.layers[0].self_attn.k_norm_moe_gen.weight[0] += 1e-2
    routing = ExpertRouting.from_gen_indexes(routings["image splits"], length)
    attend = packed_attention_fn(MIXED)
    assert_differs(mot.model(embeds, position_ids, routing, attend), expected, TIGHT_TOL, "MoT gen expert")
    unrouted = mot.model(embeds, position_ids, ExpertRouting.from_gen_indexes(routings["none"], length), attend)
    assert_close(unrouted, expected, TIGHT_TOL, "MoT without generation tokens")


# --- 3. one attention layer with q/k norms vs a hand-written §4 reference ------------------------------------


def reference_attention(x: Tensor, position_ids: Tensor, weights: dict[str, Tensor], num_heads: int,
                        num_kv_heads: int, theta: float, eps: float) -> Tensor:
    """§4 attention of one causal sample, written out. x (L, hidden) is the already-normed layer input."""
    length, hidden = x.shape
    head_dim = hidden // num_heads
    q = (x @ weights["q_proj.weight"].T + weights["q_proj.bias"]).view(length, num_heads, head_dim)
    k = (x @ weights["k_proj.weight"].T + weights["k_proj.bias"]).view(length, num_kv_heads, head_dim)
    v = (x @ weights["v_proj.weight"].T + weights["v_proj.bias"]).view(length, num_kv_heads, head_dim)

    def rms_norm(t: Tensor, weight: Tensor) -> Tensor:
        # §4: normalise in fp32, cast back to the input dtype, then scale.
        t32 = t.to(torch.float32)
        normed = t32 / torch.sqrt(t32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(t.dtype)

    q = rms_norm(q, weights["q_norm.weight"])
    k = rms_norm(k, weights["k_norm.weight"])

    # RoPE, Qwen2 default: inv_freq_j = theta^(-2j/D); angles [p * inv_freq, p * inv_freq] in fp32 as Qwen2 does.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    angles = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]

    def rotate_half(t: Tensor) -> Tensor:
        a, b = t[..., : head_dim // 2], t[..., head_dim // 2:]
        return torch.cat([-b, a], dim=-1)

    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin

    # GQA: KV head m serves query heads m*g ... m*g+g-1.
    groups = num_heads // num_kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)

    out = torch.empty(length, num_heads, head_dim, dtype=x.dtype)
    for h in range(num_heads):
        scores = q[:, h] @ k[:, h].T / math.sqrt(head_dim)  # (L, L)
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, h]
    return out.reshape(length, hidden) @ weights["o_proj.weight"].T


@torch.no_grad()
def test_qk_norm_attention_matches_handwritten_reference() -> None:
    torch.set_default_dtype(torch.float64)
    config = LLMConfig(**LLM_SIZES, qk_norm=True, layer_module="Qwen2DecoderLayer")
    model = Qwen2ForCausalLM(config).eval()
    randomize_(model, torch.Generator().manual_seed(6))
    layer = model.model.layers[0]
    weights = {name: p.detach().clone() for name, p in layer.self_attn.named_parameters()}
    assert set(weights) == {f"{n}.{w}" for n in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")} | {
        "o_proj.weight", "q_norm.weight", "k_norm.weight"}

    generator = torch.Generator().manual_seed(7)
    length = 11
    # Non-zero offset and a repeated id: positions are taken from position_ids, not from the row index.
    position_ids = torch.tensor([3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12])
    x = torch.randn(length, config.hidden_size, generator=generator)
    layout = PackedLayout((length,), (length,), ("causal",))
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    actual = layer.self_attn(x, cos, sin, ExpertRouting(None, None),
                                partial(packed_attention, layout=layout))
    args = (config.num_attention_heads, config.num_key_value_heads, config.rope_theta, config.rms_norm_eps)
    expected = reference_attention(x, position_ids, weights, *args)
    assert_close(actual, expected, FP32_STEP_TOL, "qk-norm attention vs §4 reference")

    # The reference sees each ingredient: perturbing the k-norm weight, or shifting positions non-uniformly,
    # must break agreement.
    changed = {**weights, "k_norm.weight": weights["k_norm.weight"] * 1.01}
    assert_differs(actual, reference_attention(x, position_ids, changed, *args), FP32_STEP_TOL, "k_norm weight")
    assert_differs(actual, reference_attention(x, torch.arange(length), weights, *args), FP32_STEP_TOL, "positions")


# --- 4. vision encoder vs transformers.SiglipVisionModel -----------------------------------------------------

VIT_LAYERS = 2  # HF layers == srum layers_built


def _siglip_pair() -> tuple[SiglipVisionModel, torch.nn.Module, ViTConfig]:
    torch.set_default_dtype(torch.float64)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VIT_LAYERS + 1, num_attention_heads=2,
                       image_size=56, patch_size=14)
    assert config.layers_built == VIT_LAYERS
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=VIT_LAYERS, num_attention_heads=2, image_size=56,
        patch_size=14, vision_use_head=False, attn_implementation="eager")
    hf = transformers.SiglipVisionModel(hf_config).eval()
    randomize_(hf, torch.Generator().manual_seed(8))
    srum = SiglipVisionModel(config).eval()
    hf_state = hf.state_dict()
    # transformers 5 flattens SiglipVisionModel (no ``vision_model.`` level); older versions nest it.
    hf_state = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in hf_state.items()}
    conv = "vision_model.embeddings.patch_embedding.weight"
    assert hf_state[conv].dim() == 4
    hf_state[conv] = conv_patch_weight_to_linear(hf_state[conv])
    hf_state = {k: v for k, v in hf_state.items() if k != "vision_model.embeddings.position_ids"}
    srum.load_state_dict(hf_state, strict=True)
    return srum, hf, config


def _srum_vit(model: SiglipVisionModel, images: list[Tensor], config: ViTConfig) -> Tensor:
    side = config.num_patches_per_side
    patches = torch.cat([patchify(image, config.patch_size) for image in images])
    positions = torch.cat([grid_position_ids(image.shape[1] // config.patch_size, image.shape[2] // config.patch_size,
                                             side) for image in images])
    seqlens = tuple((image.shape[1] // config.patch_size) * (image.shape[2] // config.patch_size) for image in images)
    return model(patches, positions, seqlens)


@torch.no_grad()
def test_vision_encoder_matches_hf_siglip() -> None:
    srum, hf, config = _siglip_pair()
    assert torch.equal(grid_position_ids(4, 4, 4), torch.arange(16))  # HF's default position ids
    generator = torch.Generator().manual_seed(9)
    image = torch.rand(3, 56, 56, generator=generator) * 2 - 1
    expected = hf(pixel_values=image[None]).last_hidden_state[0]  # (16, 32), post_layernorm applied
    actual = _srum_vit(srum, [image], config)
    assert expected.dtype == actual.dtype == torch.float64
    assert_close(actual, expected, FP32_STEP_TOL, "SigLIP vs HF")
    assert_differs(_srum_vit(srum, [image.transpose(1, 2)], config), expected, FP32_STEP_TOL, "patch order")

    second = torch.rand(3, 56, 56, generator=generator) * 2 - 1
    expected_both = torch.cat([expected, hf(pixel_values=second[None]).last_hidden_state[0]])
    assert_close(_srum_vit(srum, [image, second], config), expected_both, FP32_STEP_TOL, "two packed images vs HF")

    srum.vision_model.encoder.layers[-1].mlp.fc2.bias[0] += 1e-2
    assert_differs(_srum_vit(srum, [image], config), expected, FP32_STEP_TOL, "SigLIP vs HF")


@torch.no_grad()
def test_vision_encoder_packed_images_equal_separate_calls() -> None:
    srum, _, config = _siglip_pair()
    generator = torch.Generator().manual_seed(10)
    # Different sizes, non-square included: positions row * 4 + col on the 4x4 table.
    images = [torch.rand(3, h, w, generator=generator) * 2 - 1 for h, w in ((56, 56), (28, 42), (14, 56))]
    separate = torch.cat([_srum_vit(srum, [image], config) for image in images])
    packed = _srum_vit(srum, images, config)
    assert_close(packed, separate, TIGHT_TOL, "packed images vs separate calls")
    # Attention must not cross images: one sequence over all tokens differs.
    patches = torch.cat([patchify(image, config.patch_size) for image in images])
    positions = torch.cat([grid_position_ids(image.shape[1] // 14, image.shape[2] // 14, 4) for image in images])
    assert_differs(srum(patches, positions, (patches.shape[0],)), separate, TIGHT_TOL, "per-image attention")


# --- 5. conv patch embedding == linear over patchified pixels -------------------------------------------------


@pytest.mark.parametrize("height,width,patch", [(56, 56, 14), (28, 42, 14), (6, 4, 2)])
def test_conv_patch_weight_to_linear_equals_conv2d(height: int, width: int, patch: int) -> None:
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(11)
    hidden, channels = 5, 3
    # Small integers: every product and partial sum is exact in float64, so the two summation orders agree
    # bit for bit and the check is exact.
    image = torch.randint(-8, 9, (channels, height, width), generator=generator).double()
    weight = torch.randint(-8, 9, (hidden, channels, patch, patch), generator=generator).double()
    bias = torch.randint(-8, 9, (hidden,), generator=generator).double()

    conv = F.conv2d(image[None], weight, bias, stride=patch)[0]  # (hidden, h, w)
    expected = conv.flatten(1).T  # (h*w, hidden), row-major over patches
    actual = F.linear(patchify(image, patch), conv_patch_weight_to_linear(weight), bias)
    assert torch.equal(actual, expected)

    # A conversion that swaps the in-patch row and column is caught (the weight is not symmetric).
    swapped = weight.permute(0, 3, 2, 1).reshape(hidden, -1)
    assert not torch.equal(F.linear(patchify(image, patch), swapped, bias), expected)
