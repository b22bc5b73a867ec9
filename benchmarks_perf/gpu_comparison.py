"""The whole GPU comparison in one go: ``python benchmarks_perf/gpu_comparison.py`` on a CUDA machine.

For 8, 16 and 32 images of 64 x 64 tokens x 64 channels it times forward + backward of the constrained
dense-reward loss for the official-style per-image loop, the vectorised PyTorch path, torch.compile of the same
math and the fused Triton kernel (CUDA events, median of repeats), records peak memory, measures the device's
copy bandwidth and the fused kernel's share of it on the bytes it must move, and checks the xformers attention
backend against SDPA. Prints one table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from loss_providers import CHANNELS, GRID, MAP, compiled, make_inputs, official_loop, triton_fused, vectorised  # noqa: E402


def cuda_time(function, repeats: int = 20) -> float:
    """Median milliseconds of ``function`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written)."""
    source = torch.empty(int(gib * 2**30) // 4, device="cuda")
    destination = torch.empty_like(source)
    milliseconds = cuda_time(lambda: destination.copy_(source))
    return 2 * source.numel() * 4 / (milliseconds / 1e3) / 1e9


def fused_bytes(images: int, element_size: int) -> int:
    """What the fused kernel must move: read velocity and target, read the maps, write the float32 gradient."""
    tokens = images * GRID * GRID
    return tokens * CHANNELS * (2 * element_size + 4) + images * MAP * MAP * 4


def time_provider(provider, images: int, dtype: torch.dtype) -> tuple[float, float]:
    velocity, target, maps, grids = make_inputs(images, "cuda", dtype)

    def step():
        velocity.grad = None
        provider(velocity, target, maps, grids).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    milliseconds = cuda_time(step)
    return milliseconds, (torch.cuda.max_memory_allocated() - base) / 2**20


def check_xformers() -> str:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "xformers not installed"
    from srum.model.attention import PackedLayout, packed_attention

    layout = PackedLayout((300, 170), (20, 280, 11, 150, 9), ("causal", "noise", "causal", "full", "causal"))
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(470, 8, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
    k, v = (torch.randn(470, 2, 64, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(2))
    reference = packed_attention(q, k, v, layout, backend="sdpa").float()
    ours = packed_attention(q, k, v, layout, backend="xformers").float()
    error = float((ours - reference).abs().max())
    return f"xformers vs sdpa (bf16, GQA, mixed splits): max abs difference {error:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_comparison: needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    console = Console()
    bandwidth = copy_bandwidth()
    providers = {"official-loop": official_loop, "vectorised": vectorised, "torch-compile": compiled(),
                 "triton": triton_fused}
    table = Table(title=f"{torch.cuda.get_device_name()}  ({args.dtype}; copy bandwidth {bandwidth:.0f} GB/s)")
    for column in ("images", "provider", "fwd+bwd ms", "peak MiB", "vs triton", "triton % of copy bandwidth"):
        table.add_column(column, justify="right")
    results = {"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth, "dtype": args.dtype, "runs": []}
    for images in (8, 16, 32):
        timings = {name: time_provider(provider, images, dtype) for name, provider in providers.items()}
        fused_ms = timings["triton"][0]
        share = fused_bytes(images, torch.finfo(dtype).bits // 8) / (fused_ms / 1e3) / 1e9 / bandwidth * 100
        for name, (milliseconds, peak) in timings.items():
            table.add_row(str(images), name, f"{milliseconds:.3f}", f"{peak:.1f}", f"{milliseconds / fused_ms:.2f}x",
                          f"{share:.0f}%" if name == "triton" else "")
            results["runs"].append({"images": images, "provider": name, "ms": milliseconds, "peak_mib": peak})
    console.print(table)
    note = check_xformers()
    console.print(note)
    results["xformers"] = note
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
