"""DGA's step-time overhead against static mixing, next to the cost model, in one run.

One process trains one megatron-core GPT on synthetic domains and times, interleaved
round by round (so load on the machine hits all alike), one DGA period of T_r steps:

  * static: T_r training steps, weights never change;
  * exact:  T_r training steps + one exact alignment update (k backward probes);
  * fd:     T_r training steps + one finite-difference update (two forward passes);
  * instep: T_r training steps whose micro-batches, grouped by domain, each add one fused dot over
            the grad buffers, + one update (the specific gradient; probes only for domains that drew
            no single-domain micro-batch). Needs small micro-batches (--micro-batch 2).

It prints the measured overheads (median over rounds) next to the cost models
(megatron_dga/mixing/cost_model.py)

  exact: (k * b_dom + b_spe) / (T_r * B)              extra forward+backward samples
  fd:    (b_spe + 2/3 * k * b_dom) / (T_r * B)        a forward costs ~1/3 of forward+backward
  instep: b_spe / (T_r * B)                           the per-micro-batch dots are not modelled

then the bytes each update puts on the wire (payload of the all-reduces actually called,
recorded from the trainer) against (k + 1) full gradient all-reduces, and the agreement
of the fd estimator with the exact one at the same parameters on the same probe samples, and of the
in-step one with the exact one at the same update (the window's training micro-batches against the
last update's g_spe, vs fresh probes against a fresh g_spe: staleness and sampling included).
Torch runs on one thread by default, so the process CPU time measures the work done even
when other jobs share the machine; the wall-clock column is printed beside it.

    cd /work/main && .venv/bin/python benchmarks/bench_dga_overhead.py            # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_dga_overhead.py --rounds 4 --fd-sweep        # + the fd step sweep
    .venv/bin/python benchmarks/bench_dga_overhead.py --micro-batch 2              # instep's micro-batches
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

from megatron_dga.mixing.cost_model import dga_overhead

VOCAB = 256  # NullTokenizer --vocab-size 255: ids 0..254 plus eod 255


def write_shards(out_dir: str, k: int, docs: int, doc_len: int, seed: int = 0) -> dict:
    """k Markov-chain domains (own successor table each) and a specific set mixing the first two."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    eod = VOCAB - 1
    tables = [rng.permutation(eod) for _ in range(k)]

    def write(prefix, which):
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(VOCAB))
        for d in which:
            doc = np.empty(doc_len + 1, dtype=np.int64)
            doc[0], doc[-1] = rng.integers(0, eod), eod
            for t in range(1, doc_len):
                doc[t] = tables[d][doc[t - 1]] if rng.random() < 0.9 else rng.integers(0, eod)
            builder.add_document(doc, [len(doc)])
        builder.finalize(prefix + ".idx")
        return prefix

    domains = [write(os.path.join(out_dir, f"dom{i}_text_document"), [i] * docs) for i in range(k)]
    specific = write(os.path.join(out_dir, "specific_text_document"), rng.choice(2, size=docs))
    return {"domains": domains, "specific": specific}


def build_trainer(args, shards, log_dir):
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    argv = [
        "--data-path",
        *shards["domains"],
        "--specific-data-path",
        shards["specific"],
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(VOCAB - 1),
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        "4",
        "--seq-length",
        str(args.seq),
        "--make-vocab-size-divisible-by",
        "128",
        "--micro-batch-size",
        str(args.micro_batch),
        "--global-batch-size",
        str(args.batch),
        "--train-iters",
        "100000",
        "--lr",
        "1e-3",
        "--log-interval",
        "100000",
        "--eval-interval",
        "0",
        "--log-dir",
        log_dir,
        "--mixing",
        "dga",
        "--dga-interval",
        str(args.interval),
        "--dga-domain-batch-size",
        str(args.b_dom),
        "--dga-specific-batch-size",
        str(args.b_spe),
    ]
    cfg = parse_args(argv)
    ctx = platform.initialize(cfg.parallel)
    return Trainer(cfg, ctx)


class CommCounter:
    """Records the payload of every all-reduce a DGA update makes through the trainer."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.small_bytes = 0
        self.grad_syncs = 0
        view = trainer.view  # what the strategy calls
        self._all_reduce = view.all_reduce
        self._backward = view.backward
        view.all_reduce = self.all_reduce
        view.backward = self.backward

    def all_reduce(self, tensor, group="world"):
        self.small_bytes += tensor.numel() * tensor.element_size()
        return self._all_reduce(tensor, group)

    def backward(self, micro_batches, *, sync_grads):
        self.grad_syncs += int(sync_grads)
        return self._backward(micro_batches, sync_grads=sync_grads)

    def reset(self):
        self.small_bytes = self.grad_syncs = 0


def grad_buffer_bytes(trainer) -> int:
    """Bytes of one full gradient all-reduce: megatron DDP's flat grad buffers."""
    return sum(b.grad_data.numel() * b.grad_data.element_size() for ddp in trainer.ddp_chunks for b in ddp.buffers)


def use_instep(trainer, strategy) -> None:
    """Group the batches by domain and observe the micro-batches during the in-step estimator's periods only."""
    instep = getattr(strategy, "instep", None)
    trainer.after_backward = instep.observe if instep is not None else None
    trainer.data.loader.group_by_domain = instep is not None


def period(trainer, strategy, steps):
    """T_r training steps, then (strategy given) one DGA update; returns (CPU s, wall s)."""
    use_instep(trainer, strategy)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
        trainer.iteration += 1
    if strategy is not None:
        new = strategy.after_step(trainer.view)  # every period ends on a multiple of T_r: an update
        if new is not None:
            trainer.data.set_weights(new)
    return time.process_time() - cpu, time.perf_counter() - wall


def agreement(trainer, exact, fd, updates):
    """fd vs exact alignments at the same parameters on the same probe samples."""
    xs, ys = [], []
    for _ in range(updates):
        for _ in range(trainer.cfg.mixing.dga_interval):
            trainer.train_step()
            trainer.iteration += 1
        state = trainer.data.sampler.state_dict()
        xs.append(exact.measure_alignments(trainer.view).alignments)
        trainer.data.sampler.load_state_dict(state)
        ys.append(fd.measure_alignments(trainer.view).alignments)
    return np.concatenate(xs), np.concatenate(ys)


def instep_agreement(trainer, exact, instep, updates):
    """In-step alignments of each window vs the exact ones measured at the same update (same parameters),
    and, as the noise floor, a second exact measurement on other probe samples."""
    xs, ys, zs, counted = [], [], [], []
    period(trainer, instep, trainer.cfg.mixing.dga_interval)  # a window with a saved g_spe from here on
    for _ in range(updates):
        use_instep(trainer, instep)
        for _ in range(trainer.cfg.mixing.dga_interval):
            trainer.train_step()
            trainer.iteration += 1
        state = trainer.data.sampler.state_dict()
        xs.append(exact.measure_alignments(trainer.view).alignments)
        zs.append(exact.measure_alignments(trainer.view).alignments)  # the next probe samples
        trainer.data.sampler.load_state_dict(state)
        result = instep.measure_alignments(trainer.view)
        ys.append(result.alignments)
        counted.append(result.instep_domains)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(zs), counted


def fd_sweep(trainer, exact, relative_steps):
    from megatron_dga.mixing.fd import fd_alignments

    state = trainer.data.sampler.state_dict()
    ref = exact.measure_alignments(trainer.view).alignments
    cfg = trainer.cfg.mixing
    rows = []
    for rel in relative_steps:
        trainer.data.sampler.load_state_dict(state)
        est = fd_alignments(
            trainer.view,
            list(range(len(ref))),
            cfg.dga_domain_batch_size,
            cfg.dga_specific_batch_size,
            relative_step=rel,
        ).alignments
        rows.append((rel, np.corrcoef(ref, est)[0, 1], np.max(np.abs(est - ref)) / np.max(np.abs(ref))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=4, help="k")
    parser.add_argument("--b-dom", type=int, default=8)
    parser.add_argument("--b-spe", type=int, default=16)
    parser.add_argument("--interval", type=int, default=10, help="T_r")
    parser.add_argument("--batch", type=int, default=16, help="B, the global batch")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (one period per method each)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: process CPU time then measures work, robust on a shared machine)",
    )
    parser.add_argument("--fd-sweep", action="store_true", help="also sweep the fd relative step")
    parser.add_argument("--instep-updates", type=int, default=5, help="updates compared in the instep agreement")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_dga.mixing.base import build_mixing

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(tmp, args.domains, docs=64, doc_len=2 * args.seq)
        trainer = build_trainer(args, shards, os.path.join(tmp, "run"))
        exact = trainer.mixing
        fd = build_mixing(dataclasses.replace(trainer.cfg.mixing, dga_estimator="fd"), trainer.data.domain_info)
        fd.initial_weights()
        instep = build_mixing(dataclasses.replace(trainer.cfg.mixing, dga_estimator="instep"), trainer.data.domain_info)
        instep.initial_weights()
        instep.instep.attach(trainer.view)  # then switched on for its periods only (use_instep)
        methods = {"static": None, "exact": exact, "fd": fd, "instep": instep}
        estimators = ("exact", "fd", "instep")
        comm = CommCounter(trainer)
        k, T, B = args.domains, args.interval, args.batch
        n_params = sum(p.numel() for p, c in zip(trainer.params, trainer.counted_params) if c)
        print(
            f"model: {args.layers} layers x {args.hidden} hidden, seq {args.seq}, {n_params:,} parameters; "
            f"k={k}, b_dom={args.b_dom}, b_spe={args.b_spe}, T_r={T}, B={B}, micro-batch {args.micro_batch}, "
            f"torch threads {torch.get_num_threads()}"
        )

        # Warm-up (allocations, first-call costs), then interleaved rounds.
        for method in methods.values():
            period(trainer, method, T)
        times = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, method in methods.items():
                times[name].append(period(trainer, method, T))
        model = {name: dga_overhead(k, args.b_dom, args.b_spe, T, B, name) for name in estimators}
        for clock, col in (("process CPU time", 0), ("wall-clock time", 1)):
            med = {name: statistics.median(t[col] for t in v) for name, v in times.items()}
            over = {name: med[name] / med["static"] - 1.0 for name in estimators}
            per_step = ", ".join(f"{name} {1e3 * med[name] / T:.1f}" for name in methods)
            print(f"\n{clock}, median of {args.rounds} interleaved periods of T_r={T} steps, ms per step: {per_step}")
            print(f"  {'overhead':10s} {'measured':>9s} {'cost model':>11s} {'measured/model':>15s}")
            for name in estimators:
                print(f"  {name:10s} {over[name]:9.1%} {model[name]:11.1%} {over[name] / model[name]:15.2f}")
            print(
                f"  fd update / exact update: {over['fd'] / over['exact']:.2f}; "
                f"instep / exact: {over['instep'] / over['exact']:.2f}"
            )

        grad_bytes = grad_buffer_bytes(trainer)
        print("\nbytes all-reduced per update (payload; a ring all-reduce moves ~2x this per rank either way):")
        for name in estimators:
            method = methods[name]
            comm.reset()
            period(trainer, method, T)
            syncs, small = comm.grad_syncs, comm.small_bytes  # train_step syncs outside trainer.backward
            total = syncs * grad_bytes + small
            base = (k + 1) * grad_bytes
            print(
                f"  {name:6s}: {syncs} gradient all-reduce x {grad_bytes:,} B + {small:,} B of scalars = "
                f"{total:,} B  vs (k+1) gradient all-reduces {base:,} B  -> {total / base:.3f}x"
            )

        x, y = agreement(trainer, exact, fd, updates=3)
        big = np.abs(x) > 0.05 * np.abs(x).max()
        print(
            f"\nfd vs exact on the same probe samples ({x.size} alignments over 3 updates): "
            f"Pearson {np.corrcoef(x, y)[0, 1]:.6f}, max |fd - exact| / max|exact| "
            f"{np.max(np.abs(x - y)) / np.max(np.abs(x)):.2e}, sign agreement {np.mean(np.sign(x[big]) == np.sign(y[big])):.0%}"
            f" (|a| > 5% of max)"
        )
        x, y, z, counted = instep_agreement(trainer, exact, instep, updates=args.instep_updates)
        print(
            f"\ninstep vs exact at the same updates ({x.size} alignments over {args.instep_updates} updates; "
            f"domains read in-step {counted}):"
        )
        big = np.abs(x) > 0.05 * np.abs(x).max()
        for name, other in (("instep", y), ("exact, other probe samples", z)):
            print(
                f"  {name:28s} Pearson {np.corrcoef(x, other)[0, 1]:.4f}, max |diff| / max|exact| "
                f"{np.max(np.abs(x - other)) / np.max(np.abs(x)):.2f}, sign agreement "
                f"{np.mean(np.sign(x[big]) == np.sign(other[big])):.0%} (|a| > 5% of max)"
            )
        if args.fd_sweep:
            print("\nfd relative step sweep (h = step x |theta|), one update:")
            for rel, r, err in fd_sweep(trainer, exact, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]):
                print(f"  step {rel:7.0e}: Pearson {r:.6f}  max rel error {err:.2e}")
        from megatron_dga import platform

        platform.shutdown()


if __name__ == "__main__":
    main()
