"""Throughput of the fused grad_dot against torch baselines, side by side in one run.

    python benchmarks/bench_grad_dot.py                      # CPU (OpenMP kernel)
    python benchmarks/bench_grad_dot.py --device cuda        # also % of HBM bandwidth

A gradient of --numel elements is split into --tensors pieces of random sizes (as
megatron's parameters split a grad buffer). GB/s counts the bytes the dot must read
(grads + targets [+ exp_avg_sq]) divided by the median wall time of --repeats runs,
interleaved across implementations.
Baselines: ``torch.dot`` per piece (float32 in, float32 BLAS accumulation), the eager
torch expression a user would write, and the package's pure-torch reference backend.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import megatron_dga.ops as ops
from megatron_dga.ops import _backend


def _split(numel: int, pieces: int, seed: int) -> List[int]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(pieces, generator=gen) + 0.05
    sizes = (weights / weights.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    return sizes.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    return _time_all({"fn": fn}, repeats, device)["fn"]


def _time_all(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per function. Runs are interleaved round-robin so that load from
    other processes on a shared machine hits every implementation alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (allocator, thread pool, kernels)
    _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _hbm_peak_gbs(device: torch.device) -> float:
    """Theoretical peak from the device properties, or 0.0 when torch does not expose them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else 0.0


def _copy_gbs(device: torch.device, numel: int, repeats: int) -> float:
    """Achievable bandwidth: a device-to-device copy reads and writes numel fp32 elements."""
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), repeats, device)
    return 2 * 4 * numel / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=25_000_000, help="elements in the gradient")
    parser.add_argument("--tensors", type=int, default=100, help="parameter pieces it is split into")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if _backend.load_extension() is None:
        raise SystemExit(f"megatron_dga._C is not built; {_backend.BUILD_HINT}")

    gen = torch.Generator().manual_seed(0)
    sizes = _split(args.numel, args.tensors, 1)
    g32 = [torch.randn(n, generator=gen).to(device) for n in sizes]
    t32 = [torch.randn(n, generator=gen).to(device) for n in sizes]
    v32 = [torch.rand(n, generator=gen).to(device) * 1e-4 for n in sizes]
    g16 = [x.to(torch.bfloat16) for x in g32]
    bc2, eps = 0.3, 1e-8

    def eager_dot() -> torch.Tensor:
        return sum(torch.dot(g, t) for g, t in zip(g32, t32))

    def eager_precond() -> torch.Tensor:
        return sum(
            (g.float() * t / (v / bc2).sqrt().add(eps)).sum(dtype=torch.float64) for g, t, v in zip(g16, t32, v32)
        )

    cases = [
        # (label, bytes per element, {name: fn})
        (
            "fp32 grad . fp32 target",
            8,
            {
                "fused fp64 acc": lambda: ops.grad_dot(g32, t32, backend="extension"),
                "fused fp32 acc": lambda: ops.grad_dot(g32, t32, accumulate="fp32", backend="extension"),
                "torch.dot loop (fp32)": eager_dot,
                "reference backend": lambda: ops.grad_dot(g32, t32, backend="reference"),
            },
        ),
        (
            "bf16 grad . fp32 target, Adam precond (fp32 v)",
            10,
            {
                "fused fp64 acc": lambda: ops.grad_dot(
                    g16, t32, exp_avg_sq=v32, bias_correction2=bc2, backend="extension"
                ),
                "fused fp32 acc": lambda: ops.grad_dot(
                    g16, t32, exp_avg_sq=v32, bias_correction2=bc2, accumulate="fp32", backend="extension"
                ),
                "torch eager expression": eager_precond,
                "reference backend": lambda: ops.grad_dot(
                    g16, t32, exp_avg_sq=v32, bias_correction2=bc2, backend="reference"
                ),
            },
        ),
    ]

    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = f"{device.type}" + (f", {threads} threads" if threads else f", {torch.cuda.get_device_name(device)}")
    print(f"grad_dot: {args.numel:,} elements in {len(sizes)} tensors ({where}), median of {args.repeats}")
    peak = copy_bw = 0.0
    if device.type == "cuda":
        peak = _hbm_peak_gbs(device)
        copy_bw = _copy_gbs(device, args.numel, args.repeats)
        print(
            f"HBM: theoretical peak {peak:.0f} GB/s" if peak else "HBM: peak not exposed by torch",
            f"| device copy {copy_bw:.0f} GB/s",
        )
    for label, bytes_per_elem, fns in cases:
        print(f"\n{label} ({bytes_per_elem} B/element read)")
        header = f"  {'implementation':<26}{'ms':>9}{'GB/s':>9}{'vs fused fp64':>15}"
        if device.type == "cuda":
            header += f"{'% peak':>9}{'% copy':>9}"
        print(header)
        base = None
        for name, seconds in _time_all(fns, args.repeats, device).items():
            gbs = bytes_per_elem * args.numel / seconds / 1e9
            base = base or seconds
            row = f"  {name:<26}{seconds * 1e3:9.2f}{gbs:9.2f}{base / seconds:14.2f}x"
            if device.type == "cuda":
                row += f"{100 * gbs / peak:8.1f}%" if peak else f"{'-':>9}"
                row += f"{100 * gbs / copy_bw:8.1f}%"
            print(row)
    a = float(ops.grad_dot(g16, t32, exp_avg_sq=v32, bias_correction2=bc2, backend="extension"))
    b = float(ops.grad_dot(g16, t32, exp_avg_sq=v32, bias_correction2=bc2, backend="reference"))
    print(f"\nfused vs reference (precond, fp64): {a:.12g} vs {b:.12g}, rel. diff {abs(a - b) / abs(b):.2e}")


if __name__ == "__main__":
    main()
