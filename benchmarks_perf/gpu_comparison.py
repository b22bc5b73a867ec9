"""The constrained dense-reward loss on a GPU, kernel against kernel: ``python benchmarks_perf/gpu_comparison.py``.

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
the measured device-to-device copy bandwidth. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
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
    """Loss functions of (velocity, target, maps, grids); ``triton`` only on CUDA, with its layout prebuilt."""
    found: dict[str, Callable] = {
        "official-eager": official_loop,
        "vectorised": lambda v, t, m, g: dense_reward_flow_loss(v, t, t, m, g, CONFIG, impl="torch"),
    }
    if device == "cuda":
        from srum_kernels.reward_flow import FusedRewardFlowLoss, RaggedLayout

        found["official-compiled"] = torch.compile(official_loop, dynamic=False)
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
        errors[name] = max(abs(float(loss) - float(expected)) / abs(float(expected)),
                           float((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()))
        if errors[name] > rtol:
            raise SystemExit(f"gpu_comparison: {name} differs from the float64 reference by {errors[name]:.2e} "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_comparison: needs a CUDA GPU")
    from rich.console import Console
    from rich.table import Table

    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth()
    table = Table(title=f"{torch.cuda.get_device_name()} ({args.dtype}; copy bandwidth {bandwidth:.0f} GB/s)")
    for column in ("images", "provider", "fwd+bwd ms (L2 flushed)", "ms (20 calls per event pair)",
                   "vs official-eager", "vs official-compiled", "% of copy bandwidth", "max rel. error"):
        table.add_column(column, justify="right")
    results = {"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth, "dtype": args.dtype, "runs": []}
    for images in (8, 16, 32):
        inputs = make_inputs(images, "cuda", dtype, map_side=OFFICIAL_MAP)
        functions = providers("cuda", inputs[3], inputs[2])
        errors = check_against_reference(inputs, functions, rtol=1e-5 if dtype == torch.float32 else 1e-2)
        timings = {name: kernel_milliseconds(forward_backward(f, inputs)) for name, f in functions.items()}
        steady = {name: steady_milliseconds(forward_backward(f, inputs)) for name, f in functions.items()}
        moved = loss_bytes(images, torch.finfo(dtype).bits // 8)
        for name, milliseconds in timings.items():
            share = moved / (milliseconds / 1e3) / 1e9 / bandwidth * 100
            table.add_row(str(images), name, f"{milliseconds:.3f}", f"{steady[name]:.3f}",
                          f"{timings['official-eager'] / milliseconds:.2f}x",
                          f"{timings['official-compiled'] / milliseconds:.2f}x",
                          f"{share:.0f}%" if name == "triton" else "", f"{errors[name]:.1e}")
            results["runs"].append({"images": images, "provider": name, "ms": milliseconds,
                                    "steady_ms": steady[name], "error": errors[name],
                                    "bytes": moved if name == "triton" else None})
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
