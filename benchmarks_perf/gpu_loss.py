"""The constrained dense-reward loss, kernel against kernel: the ``loss`` section of ``gpu_check.sh``.

At the official sizes (8, 16 and 32 images of 64 x 64 latent tokens x 64 channels, 1024 x 1024 reward maps) it
compares forward + backward of:

- ``official-eager``: the plain official formula (``loss_providers.official_loop``: per-image ``F.interpolate`` of
  the map, reward-weighted squared error plus lambda times the squared error, through autograd);
- ``official-compiled``: ``torch.compile`` of that same formula;
- ``vectorised``: srum's PyTorch path (``impl="torch"``);
- ``triton``: srum's fused kernel, its layout built once outside the timing.

Every provider is first checked on the device against the float64 reference (loss and gradient); timing starts
only if all agree. Each provider is timed two ways, with every input made beforehand so that what is timed is the
kernels, not the host: one call at a time after an L2 flush (a write of twice the cache), between its own pair of
CUDA events; and 20 calls back to back between one pair (the steady state). Bytes
counted for the fused kernel are those it must move forward (read velocity and target, four map samples per
token, write the float32 gradient) and backward (read the gradient, write the velocity's gradient), compared with
the measured device-to-device copy bandwidth. On the CPU (``--cpu``) only the checks run, at small sizes, the
fused kernel in the Triton interpreter.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from srum.loss import LossConfig, dense_reward_flow_loss, reference_loss

sys.path.insert(0, str(Path(__file__).parent))
from loss_providers import CHANNELS, GRID, make_inputs, official_loop  # noqa: E402

Inputs = tuple[Tensor, Tensor, list[Tensor], list[tuple[int, int]]]

OFFICIAL_MAP = 1024
"""Official reward maps are full-resolution: 1024 x 1024 for a 1024 px image of 64 x 64 latent tokens."""
CONFIG = LossConfig()
"""The official rule: unsigned, lambda 0.5, the constraint target being the flow target itself."""


def providers(device: str, grids: list[tuple[int, int]], maps: list[Tensor]) -> dict[str, Callable]:
    """Loss functions of (velocity, target, maps, grids); ``triton`` on CUDA or in the Triton interpreter, with
    its layout prebuilt; ``official-compiled`` on CUDA."""
    found: dict[str, Callable] = {
        "official-eager": official_loop,
        "vectorised": lambda v, t, m, g: dense_reward_flow_loss(v, t, t, m, g, CONFIG, impl="torch"),
    }
    if device == "cuda":
        found["official-compiled"] = torch.compile(official_loop, dynamic=False)
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from srum_kernels.reward_flow import FusedRewardFlowLoss, RaggedLayout

        layout = RaggedLayout.build(maps, grids, torch.device(device))
        found["triton"] = lambda v, t, m, g: FusedRewardFlowLoss.apply(v, t, t, layout, CONFIG.constraint_weight,
                                                                       False, CONFIG.margin, float(v.shape[0]))
    return found


def check_against_reference(inputs: Inputs, functions: dict[str, Callable], rtol: float = 1e-5) -> dict[str, float]:
    """Each provider's largest relative error (loss and gradient) against the float64 reference on the same
    device; raises if any exceeds ``rtol``, so nothing wrong is ever timed."""
    velocity, target, maps, grids = inputs
    wide = velocity.detach().double().requires_grad_(True)
    expected = reference_loss(wide, target.double(), target.double(), [m.double() for m in maps], grids, CONFIG)
    (expected_grad,) = torch.autograd.grad(expected, wide)
    errors = {}
    for name, function in functions.items():
        loss = function(velocity, target, maps, grids)
        (grad,) = torch.autograd.grad(loss, velocity)
        loss = loss.detach()
        errors[name] = max(abs(float(loss) - float(expected)) / abs(float(expected)),
                           float((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()))
        if errors[name] > rtol:
            raise SystemExit(f"gpu_check loss: {name} differs from the float64 reference by {errors[name]:.2e} "
                             f"(allowed {rtol:.0e}); not timing it")
    return errors


def loss_bytes(images: int, element_size: int, grid: int = GRID) -> int:
    """Bytes the fused loss must move, forward and backward (see the module docstring)."""
    tokens = images * grid * grid
    forward = tokens * CHANNELS * 2 * element_size + tokens * 4 * 4 + tokens * CHANNELS * 4
    backward = tokens * CHANNELS * 4 + tokens * CHANNELS * element_size
    return forward + backward


def kernel_milliseconds(call: Callable[[], None], repeats: int = 30) -> float:
    """Median milliseconds of ``call`` alone: each run after an L2 flush, between its own pair of events."""
    flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size // 4 + 1, device="cuda")
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        flush.fill_(0.0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def steady_milliseconds(call: Callable[[], None], calls: int = 20, repeats: int = 5) -> float:
    """Median milliseconds per call over ``calls`` back-to-back calls between one pair of events (the steady
    state: the event cost amortised, the cache as a training loop leaves it)."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written)."""
    source = torch.empty(int(gib * 2**30) // 4, device="cuda")
    destination = torch.empty_like(source)
    milliseconds = kernel_milliseconds(lambda: destination.copy_(source), repeats=10)
    return 2 * source.numel() * 4 / (milliseconds / 1e3) / 1e9


def forward_backward(function: Callable, inputs: Inputs) -> Callable[[], None]:
    velocity, target, maps, grids = inputs

    def call() -> None:
        velocity.grad = None
        function(velocity, target, maps, grids).backward()

    return call


def section(device: str) -> dict:
    """Checks, then (on CUDA) times, every provider; returns the rows of the results file."""
    if device != "cuda":
        inputs = make_inputs(3, device, map_side=96, grid=8)
        errors = check_against_reference(inputs, providers(device, inputs[3], inputs[2]))
        return {"checked": {name: {"max_rel_error": error} for name, error in errors.items()}}
    bandwidth = copy_bandwidth()
    runs = []
    for images in (8, 16, 32):
        inputs = make_inputs(images, "cuda", torch.float32, map_side=OFFICIAL_MAP)
        functions = providers("cuda", inputs[3], inputs[2])
        errors = check_against_reference(inputs, functions)
        timings = {name: kernel_milliseconds(forward_backward(f, inputs)) for name, f in functions.items()}
        steady = {name: steady_milliseconds(forward_backward(f, inputs)) for name, f in functions.items()}
        moved = loss_bytes(images, 4)
        copy_ms = moved / (bandwidth * 1e9) * 1e3  # a device-to-device copy of the same bytes
        for name, milliseconds in timings.items():
            runs.append({"images": images, "provider": name, "ms": milliseconds, "steady_ms": steady[name],
                         "vs_official_eager": timings["official-eager"] / milliseconds,
                         "vs_official_compiled": timings["official-compiled"] / milliseconds,
                         "copy_of_same_bytes_ms": copy_ms if name == "triton" else None,
                         "percent_of_copy_speed": 100 * copy_ms / milliseconds if name == "triton" else None,
                         "max_rel_error": errors[name]})
    return {"copy_gbps": bandwidth, "runs": runs}
