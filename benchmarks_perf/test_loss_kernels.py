"""Forward + backward of the constrained dense-reward loss over 8-32 images of 64 x 64 tokens x 64 channels:
the official-style per-image loop, the vectorised PyTorch path, torch.compile of the same math and the fused
Triton kernel (GPU only: the Triton interpreter is a correctness tool, not a benchmark)."""

from __future__ import annotations

import pytest
import torch
from loss_providers import compiled, make_inputs, official_loop, triton_fused, vectorised

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROVIDERS = {"official-loop": official_loop, "vectorised": vectorised}
if CUDA:
    PROVIDERS["triton"] = triton_fused


def test_providers_agree():
    velocity, target, maps, grids = make_inputs(3, DEVICE)
    values = {name: float(provider(velocity, target, maps, grids)) for name, provider in PROVIDERS.items()}
    for name, value in values.items():
        assert value == pytest.approx(values["official-loop"], rel=1e-5), name


@pytest.mark.parametrize("images", [8, 32])
@pytest.mark.parametrize("name", [*PROVIDERS, "torch-compile"])
def test_loss_forward_backward(benchmark, name, images):
    provider = compiled() if name == "torch-compile" else PROVIDERS[name]
    velocity, target, maps, grids = make_inputs(images, DEVICE)

    def step():
        velocity.grad = None
        provider(velocity, target, maps, grids).backward()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"reward-loss-fwd-bwd-{images}-images"
    step()  # warm-up (compiles)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    benchmark.extra_info["images"] = images
    if CUDA:
        benchmark.extra_info["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
