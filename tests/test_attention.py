"""Packed attention: BAGEL's mask rules (§6.3) and the agreement of the sdpa, flex and xformers backends."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from srum.model.attention import (
    XFORMERS_ERROR,
    PackedLayout,
    allowed_mask,
    dense_masks,
    flex_block_mask,
    packed_attention,
    varlen_attention,
    varlen_plan,
)

# Eager flex_attention on CPU warns that it is unfused; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FIXTURE = "reference/fixtures/bagel-tiny-public"

# Two noise splits in one sample, text and a clean image after a noise split, a sample that opens with a noise
# split, length-1 splits.
TRICKY = PackedLayout(
    sample_lens=(14, 6, 1),
    split_lens=(3, 4, 2, 3, 2, 1, 4, 1, 1),
    attn_modes=("causal", "noise", "full", "noise", "causal", "noise", "causal", "full", "causal"),
)


def random_layout(rng: random.Random, max_samples: int = 3, max_splits: int = 4, max_len: int = 6) -> PackedLayout:
    split_lens, modes, sample_lens = [], [], []
    for _ in range(rng.randint(1, max_samples)):
        lens = [rng.randint(1, max_len) for _ in range(rng.randint(1, max_splits))]
        split_lens += lens
        modes += rng.choices(("causal", "full", "noise"), k=len(lens))
        sample_lens.append(sum(lens))
    return PackedLayout(tuple(sample_lens), tuple(split_lens), tuple(modes))


LAYOUTS = [TRICKY, *(random_layout(random.Random(seed)) for seed in range(6))]


def rule_table(layout: PackedLayout) -> torch.Tensor:
    """The §6.3 table, written out token pair by token pair, independent of the module's helpers."""
    tokens = []  # (sample, split, mode) per packed token
    split = 0
    for sample, sample_len in enumerate(layout.sample_lens):
        filled = 0
        while filled < sample_len:
            tokens += [(sample, split, layout.attn_modes[split])] * layout.split_lens[split]
            filled += layout.split_lens[split]
            split += 1
    n = len(tokens)
    table = torch.zeros(n, n, dtype=torch.bool)
    for q, (q_sample, i, q_mode) in enumerate(tokens):
        for k, (k_sample, j, k_mode) in enumerate(tokens):
            if q_sample != k_sample or j > i:
                allowed = False
            elif j < i:
                allowed = k_mode != "noise"
            else:
                allowed = k <= q if q_mode == "causal" else True
            table[q, k] = allowed
    return table


def random_qkv(layout: PackedLayout, hq: int = 4, hkv: int = 2, d: int = 8, dtype=torch.float64):
    n = layout.total_len
    return torch.randn(n, hq, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype)


def naive_attention(q, k, v, allowed, scale):
    """Softmax attention over the whole packed sequence, one query head at a time; KV head = query head // g."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        scores = q[:, h] @ k[:, h // groups].T * scale  # (L, L)
        out[:, h] = scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v[:, h // groups]
    return out


def reference_varlen_kernel(q, k, v, group, causal, scale):
    """Plain varlen attention: one SDPA per segment, causal segments aligned bottom-right."""
    outs = []
    for qs, ks, vs in zip(q.split(group.q_seqlens), k.split(group.kv_seqlens), v.split(group.kv_seqlens), strict=True):
        lq, lk = len(qs), len(ks)
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq if causal else None
        qs, ks, vs = (x.transpose(0, 1) for x in (qs, ks, vs))  # (H, Ls, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)  # (Nq, H, D)


def test_dense_masks_match_official_fixture(shared_dir):
    folder = shared_dir / FIXTURE
    meta = json.loads((folder / "cases_meta.json").read_text())["a"]
    tensors = load_file(folder / "cases.safetensors")
    layout = PackedLayout(meta["sample_lens"], meta["split_lens"], meta["attn_modes"])
    masks = dense_masks(layout)
    assert len(masks) == len(meta["sample_lens"])
    for i, mask in enumerate(masks):
        expected = tensors[f"a.in.nested_attention_masks.{i}"]
        assert mask.dtype == expected.dtype and torch.equal(mask, expected), f"sample {i}"


@pytest.mark.parametrize("layout", [*LAYOUTS, *(random_layout(random.Random(100 + s), 4, 5) for s in range(20))])
def test_allowed_mask_follows_rule_table(layout):
    expected = rule_table(layout)
    assert torch.equal(allowed_mask(layout), expected)
    # The dense masks are the diagonal blocks of the same table.
    for (start, end), mask in zip(layout.sample_bounds, dense_masks(layout, torch.float64), strict=True):
        assert torch.equal(mask == 0, expected[start:end, start:end])
        assert torch.equal(mask != 0, mask == -math.inf)


@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_sdpa_matches_naive_attention_with_gqa_and_scale(layout):
    q, k, v = (x.requires_grad_() for x in random_qkv(layout, hq=6, hkv=2))
    grad_out = torch.randn_like(q)
    scale = 0.3
    results = []
    for out in (packed_attention(q, k, v, layout, scale=scale), naive_attention(q, k, v, rule_table(layout), scale)):
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    # float64: both are the same sums in a different order.
    for got, expected, name in zip(*results, ("out", "dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_noise_split_keys_are_invisible_to_other_splits(backend):
    layout = TRICKY
    q, k, v = random_qkv(layout)
    out = packed_attention(q, k, v, layout, backend)
    for split, (start, end) in enumerate(layout.split_bounds):
        if layout.attn_modes[split] != "noise":
            continue
        k2, v2 = k.clone(), v.clone()
        k2[start:end] += 3.0
        v2[start:end] -= 5.0
        out2 = packed_attention(q, k2, v2, layout, backend)
        outside = torch.ones(layout.total_len, dtype=torch.bool)
        outside[start:end] = False
        # Blocked scores are exactly -inf, so perturbed keys contribute exactly 0 outside the split.
        assert torch.equal(out2[outside], out[outside]), f"split {split}"
        assert not torch.allclose(out2[start:end], out[start:end]), f"split {split} must see its own keys"


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_equals_each_sample_alone(backend):
    layout = TRICKY
    q, k, v = random_qkv(layout)
    packed = packed_attention(q, k, v, layout, backend)
    for splits, (start, end) in zip(layout.sample_split_ranges, layout.sample_bounds, strict=True):
        alone = PackedLayout(
            (end - start,),
            tuple(layout.split_lens[i] for i in splits),
            tuple(layout.attn_modes[i] for i in splits),
        )
        single = packed_attention(q[start:end], k[start:end], v[start:end], alone, backend)
        torch.testing.assert_close(packed[start:end], single, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("layout", "hq", "hkv"), [(LAYOUTS[0], 4, 2), (LAYOUTS[1], 3, 3), (LAYOUTS[2], 4, 1)])
def test_flex_matches_sdpa(layout, hq, hkv):
    # Forward only: flex_attention has no backward on CPU (gradients are compared in the GPU test).
    q, k, v = (x.float() for x in random_qkv(layout, hq, hkv, d=16))
    # float32, at most ~20 keys per softmax over O(1) scores: the two paths differ only in summation order, so
    # differences stay near the float32 epsilon (1.2e-7) times a small factor; 1e-5 leaves ample room.
    torch.testing.assert_close(
        packed_attention(q, k, v, layout, "flex"), packed_attention(q, k, v, layout, "sdpa"), atol=1e-5, rtol=1e-5
    )


def test_flex_block_mask_covers_allowed_blocks():
    block = 4
    layout = TRICKY
    block_mask = flex_block_mask(layout, block_size=block)
    n = layout.total_len
    blocks = -(-n // block)
    padded = torch.zeros(blocks * block, blocks * block, dtype=torch.bool)
    padded[:n, :n] = allowed_mask(layout)
    expected = padded.view(blocks, block, blocks, block).any(dim=(1, 3))  # (Q blocks, KV blocks)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), expected)
    # Built once per layout: an equal layout gets the cached mask.
    same = PackedLayout(list(layout.sample_lens), list(layout.split_lens), list(layout.attn_modes))
    assert flex_block_mask(same, "cpu", block) is block_mask


@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_plan_reference_matches_sdpa(layout):
    q, k, v = random_qkv(layout, hq=4, hkv=2)
    plan = varlen_plan(layout)
    assert all(lk >= lq for lq, lk in zip(plan.causal.q_seqlens, plan.causal.kv_seqlens, strict=True))
    assert sorted(plan.causal.q_index.tolist() + plan.full.q_index.tolist()) == list(range(layout.total_len))
    got = varlen_attention(q, k, v, plan, reference_varlen_kernel, scale=0.2)
    expected = packed_attention(q, k, v, layout, "sdpa", scale=0.2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_xformers_on_cpu_raises_clear_error():
    q, k, v = random_qkv(TRICKY, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=f"^{re.escape(XFORMERS_ERROR)}$"):
        packed_attention(q, k, v, TRICKY, "xformers")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_lens": (5, 4), "split_lens": (3, 3, 2), "attn_modes": ("causal",) * 3}, "split_lens"),
        ({"sample_lens": (5, 4), "split_lens": (3, 3, 3), "attn_modes": ("causal",) * 3}, "split_lens"),
        ({"sample_lens": (4,), "split_lens": (2, 2), "attn_modes": ("causal", "bidirectional")}, "attn_modes"),
        ({"sample_lens": (4,), "split_lens": (2, 2), "attn_modes": ("causal",)}, "attn_modes"),
        ({"sample_lens": (4,), "split_lens": (4, 0), "attn_modes": ("causal", "full")}, "split_lens"),
        ({"sample_lens": (), "split_lens": (), "attn_modes": ()}, "sample_lens"),
    ],
)
def test_invalid_layout_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        PackedLayout(**kwargs)


def test_bad_shapes_and_backend_raise():
    q, k, v = random_qkv(TRICKY, hq=4, hkv=2)
    with pytest.raises(ValueError, match="L = 21"):
        packed_attention(q[:-1], k[:-1], v[:-1], TRICKY)
    with pytest.raises(ValueError, match=r"expected q \(L, Hq, D\)"):
        packed_attention(q[None], k, v, TRICKY)
    with pytest.raises(ValueError, match=r"expected q \(L, Hq, D\)"):
        packed_attention(q, k[..., :4], v[..., :4], TRICKY)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        packed_attention(q[:, :3], k, v, TRICKY)
    with pytest.raises(ValueError, match=r"^backend: expected"):
        packed_attention(q, k, v, TRICKY, "flash")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    # float32: the kernels differ in tiling and summation order only (TF32 stays off for them by default).
    # bfloat16: inputs and outputs are rounded to 8 mantissa bits (eps 7.8e-3), a few roundings of O(1) values.
    ("dtype", "tol"),
    [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)],
)
@pytest.mark.parametrize(
    "backend",
    [
        "flex",
        pytest.param(
            "xformers",
            marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="needs xformers"),
        ),
    ],
)
def test_gpu_backend_matches_sdpa(backend, dtype, tol):
    # Long enough for several 128-token blocks, so the compiled flex kernel exercises block sparsity.
    rng = random.Random(0)
    layout = random_layout(rng, max_samples=4, max_splits=5, max_len=200)
    q, k, v = (x.to("cuda", dtype).requires_grad_() for x in random_qkv(layout, hq=8, hkv=2, d=64))
    grad_out = torch.randn_like(q)
    results = []
    for name in ("sdpa", backend):
        out = packed_attention(q, k, v, layout, name)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got, expected, name in zip(results[1], results[0], ("out", "dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
