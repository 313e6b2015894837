"""Dynamic mixture sampler vs megatron-core's static blending, measured side by side.

Prints, for the same number of samples:
  * index throughput of DynamicMixtureSampler (one global batch per call, and
    `global_batches(T)` for T steps between mixing updates) vs megatron-core's
    helpers_cpp.build_blending_indices (the C++ greedy behind BlendedDataset; it
    produces dataset ids and per-dataset counters only, no within-domain shuffle);
  * the cost of a weight change: set_weights for k=64 and set_basis_weights for
    K=262144 fine domains with N=32 basis rows (dense and CSR);
  * one global batch at K=262144, all domains non-empty and with 60% of them empty
    (fine domains of a clustering whose leaves hold no documents);
  * the time a step waits for its global batch at K=262144, computed on demand vs by the
    look-ahead (``prefetch()``: the next batch computed in a background thread during the step).

Ours runs on the C++ kernels of megatron_dga._C, the sampler's only implementation (the
numpy oracle in tests/ exists to check them, not to run). Both sides are single-threaded.
Timings are best-of-N, the two sides interleaved, so that load from other processes on a
shared machine hits both alike; the load average is printed with the table.

    cd /work/main && .venv/bin/python benchmarks/bench_sampler.py
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import scipy.sparse as sp

from megatron_dga.data.sampler import DynamicMixtureSampler, MixtureSamplerConfig, load_kernels

# megatron-core announces at import that apex/TE are absent: expected on CPU, not part of the table.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def megatron_blending(weights, n):
    from megatron.core.datasets import helpers_cpp

    dataset_index = np.zeros(n, dtype=np.int16)
    dataset_sample_index = np.zeros(n, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, weights, weights.size, n, False)


def throughput(k, gbs, steps, per_call, repeat, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1_000, 100_000, k)
    w = rng.dirichlet(np.ones(k))
    n = gbs * steps

    def ours():
        s = DynamicMixtureSampler(sizes, MixtureSamplerConfig(global_batch_size=gbs, micro_batch_size=1), weights=w)
        for _ in range(steps // per_call):
            s.global_batches(per_call)

    t_ours, t_meg = float("inf"), float("inf")
    for _ in range(repeat):  # interleaved, so a burst of outside load hits both sides
        t_ours = min(t_ours, best_of(ours, 1))
        t_meg = min(t_meg, best_of(lambda: megatron_blending(w, n), 1))
    return n, n / t_ours, n / t_meg


def weight_change_costs():
    rng = np.random.default_rng(1)
    out = {}
    s = DynamicMixtureSampler(np.full(64, 1000), MixtureSamplerConfig(global_batch_size=512, micro_batch_size=1))
    ws = rng.dirichlet(np.ones(64), size=200)
    out["set_weights k=64"] = best_of(lambda: [s.set_weights(w) for w in ws], 5) / len(ws)
    K, N = 262_144, 32
    big = DynamicMixtureSampler(np.full(K, 100), MixtureSamplerConfig(global_batch_size=512, micro_batch_size=1))
    out["set_weights K=262144"] = best_of(lambda: big.set_weights(rng.random(K)), 5)
    dense = rng.random((N, K)) * (rng.random((N, K)) < 0.05)
    dense[:, 0] += 1e-6
    dense /= dense.sum(axis=1, keepdims=True)
    gammas = rng.dirichlet(np.ones(N), size=20)
    for label, P in (("dense", dense), ("CSR 5%", sp.csr_matrix(dense))):
        t = time.perf_counter()
        big.set_basis(P)
        out[f"set_basis (once) K={K} N={N} {label}"] = time.perf_counter() - t
        out[f"set_basis_weights K={K} N={N} {label}"] = best_of(
            lambda: [big.set_basis_weights(g) for g in gammas], 3
        ) / len(gammas)
    big.set_basis_weights(gammas[0])
    out[f"global_batch K={K} (GBS 512)"] = best_of(big.global_batch, 5)
    # 60% empty domains: the kernel runs over the non-empty ones only, basis rows renormalised.
    sizes = np.where(rng.random(K) < 0.6, 0, 100)
    sparse = DynamicMixtureSampler(sizes, MixtureSamplerConfig(global_batch_size=512, micro_batch_size=1))
    sparse.set_basis(sp.csr_matrix(dense))
    sparse.set_basis_weights(gammas[0])
    out[f"global_batch K={K}, 60% empty (GBS 512)"] = best_of(sparse.global_batch, 5)
    return out


def critical_path(k=262_144, gbs=512, steps=40, step_ms=20.0, empty=0.0):
    """Time spent inside global_batch() per step, without and with the look-ahead.

    Between two batches the trainer runs a step; on a GPU host the CPU mostly waits for it, which
    ``time.sleep(step_ms)`` stands in for. With ``prefetch()`` after each batch (what the trainer's
    StepLoader does) the next batch is computed during that wait. Both sides draw the same batches
    (checked). Returns (ms per call on demand, ms per call with look-ahead, look-ahead hits).
    """
    rng = np.random.default_rng(3)
    sizes = np.where(rng.random(k) < empty, 0, 100)
    w = rng.random(k)

    def run(lookahead):
        s = DynamicMixtureSampler(sizes, MixtureSamplerConfig(global_batch_size=gbs, micro_batch_size=1), weights=w)
        spent, batches = 0.0, []
        for _ in range(steps):
            t = time.perf_counter()
            batches.append(s.global_batch())
            spent += time.perf_counter() - t
            if lookahead:
                s.prefetch()
            time.sleep(step_ms / 1e3)
        return spent / steps, np.stack(batches), s.lookahead_hits

    on_demand, a, _ = run(False)
    ahead, b, hits = run(True)
    assert np.array_equal(a, b), "the look-ahead changed the batches"
    return on_demand, ahead, hits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256, help="global batches per throughput measurement")
    parser.add_argument("--repeat", type=int, default=7, help="best of this many timings per side")
    args = parser.parse_args()
    print(
        f"ours: the C++ kernels of {load_kernels().__file__}; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
    )
    print(f"== index throughput (samples/s), same number of samples, best of {args.repeat} ==")
    print(f"{'k':>5} {'GBS':>5} {'per call':>8} {'samples':>9} {'ours':>12} {'megatron':>12} {'ratio':>7}")
    for k, gbs, per_call in [(8, 1024, 1), (64, 1024, 1), (8, 1024, 32), (64, 1024, 32), (64, 4096, 32)]:
        n, ours, meg = throughput(k, gbs, args.steps, per_call, args.repeat)
        print(f"{k:>5} {gbs:>5} {per_call:>8} {n:>9} {ours:>12,.0f} {meg:>12,.0f} {ours / meg:>6.2f}x")
    print("== weight change cost ==")
    for name, seconds in weight_change_costs().items():
        print(f"{name:<46} {seconds * 1e3:9.3f} ms")
    print("== global batch on the critical path, K=262144, GBS 512, a 20 ms step between batches (40 steps) ==")
    print(f"{'domains':<22} {'on demand':>10} {'look-ahead':>11} {'ratio':>7} {'hits':>5}")
    for label, empty in (("all non-empty", 0.0), ("60% empty", 0.6)):
        on_demand, ahead, hits = critical_path(empty=empty)
        print(f"{label:<22} {on_demand * 1e3:8.3f}ms {ahead * 1e3:9.3f}ms {ahead / on_demand:6.3f}x {hits:>5}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
