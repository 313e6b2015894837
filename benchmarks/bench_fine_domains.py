"""Fine domains from a domain map at scale: start-up, cache hit, memory and sampler share of a step.

Writes synthetic shards once (``--documents`` documents of 50-500 tokens in 4 shards) and a random
hierarchical map per K (1,024 = 32 x 32, 16,384 = 128 x 128, 262,144 = 64 x 64 x 64), then, for each
K in a fresh process (so peak RSS is that K's alone), measures what the trainer does with
``--data-path SHARDS --domain-map MAP --data-cache-path DIR``:

* start-up: the trainer's data pipeline (map read and checks against the shards, the fine-domain
  index, the per-top-level-cluster eval index, the sampler), with an empty cache, and the first
  global batch read from the shards;
* cache hit: the same pipeline again, the index loaded from --data-cache-path;
* peak RSS of that process (``resource.getrusage``; it includes torch, megatron-core and the model);
* per step: the sampler's ``global_batch`` time inside real training steps of a small GPT
  (``--model-args``, default 4 layers, hidden 256, seq 256, global batch 32) on the CPU, and its
  share of the step.

Goals (issue 12): start-up < 60 s and RSS < 4 GB at K = 262,144 over 1M documents on 2 cores;
sampler < 2 % of a step.

    cd /work/main && .venv/bin/python benchmarks/bench_fine_domains.py [--documents 1000000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

LEVELS = {1024: [32, 32], 16384: [128, 128], 262144: [64, 64, 64]}
VOCAB = 128  # NullTokenizer --vocab-size 127: ids 0..126 and eod 127
EOD = VOCAB - 1
MODEL_ARGS = (
    "--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 "
    "--micro-batch-size 8 --global-batch-size 32"
)


def write_corpus(directory: str, documents: int, shards: int = 4, seed: int = 0) -> list:
    """``documents`` documents of 50-500 tokens (the last one eod) in ``shards`` shards; returns the prefixes."""
    from megatron_dga.data.mock import write_packed_shard

    rng = np.random.default_rng(seed)
    prefixes = []
    for s, n in enumerate(np.diff(np.linspace(0, documents, shards + 1).astype(np.int64))):
        prefix = os.path.join(directory, f"web{s}_text_document")
        if not os.path.isfile(prefix + ".idx"):
            lengths = rng.integers(50, 501, size=int(n))
            tokens = rng.integers(0, EOD, size=int(lengths.sum()), dtype=np.uint16)
            tokens[np.cumsum(lengths) - 1] = EOD
            write_packed_shard(prefix, tokens, lengths, VOCAB)
            print(f"  wrote {prefix} ({n} documents, {lengths.sum():,} tokens)", file=sys.stderr, flush=True)
        prefixes.append(prefix)
    return prefixes


def write_map(path: str, prefixes: list, levels: list, seed: int = 0) -> str:
    """A random map of prod(levels) fine domains over the shards' documents."""
    from megatron_dga.data.domain_map import DomainMap, shard_identity, write_domain_map

    if not os.path.isfile(path):
        shards = [shard_identity(p) for p in prefixes]
        k = int(np.prod(levels))
        ids = np.random.default_rng(seed).integers(0, k, size=sum(s.num_documents for s in shards)).astype(np.int32)
        write_domain_map(path, DomainMap(ids, shards, list(levels), metadata={"tool": "bench_fine_domains"}))
    return path


def worker(args) -> dict:
    """One K: the measurements above, in this (fresh) process."""
    import resource

    warnings.filterwarnings("ignore")
    from megatron_dga import platform
    from megatron_dga.logging_setup import setup_logging
    from megatron_dga.training.arguments import parse_args

    setup_logging()
    cache, run = tempfile.mkdtemp(prefix="fine-cache-"), tempfile.mkdtemp(prefix="fine-run-")
    argv = [
        "--data-path",
        *args.prefixes,
        "--domain-map",
        args.map,
        "--data-cache-path",
        cache,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(VOCAB - 1),
        *args.model_args.split(),
        "--make-vocab-size-divisible-by",
        "64",
        "--train-iters",
        "1000",
        "--eval-interval",
        "0",
        "--lr",
        "1e-4",
        "--log-dir",
        run,
        "--mixing",
        "natural",
    ]
    cfg = parse_args(argv)
    ctx = platform.initialize(cfg.parallel)
    from megatron_dga.training.data import DataPipeline
    from megatron_dga.training.trainer import Trainer

    out = {}
    t = time.perf_counter()
    data = DataPipeline(cfg, ctx)
    out["startup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    data.next_train_micro_batches()
    out["first_batch_s"] = time.perf_counter() - t
    out["empty_domains"] = int(np.count_nonzero(data.sampler.domain_sizes == 0))
    del data
    t = time.perf_counter()
    DataPipeline(cfg, ctx)
    out["cache_hit_s"] = time.perf_counter() - t
    trainer = Trainer(cfg, ctx)
    sampler, spent = trainer.data.sampler, [0.0]
    draw = sampler.global_batch

    def timed_draw():
        start = time.perf_counter()
        try:
            return draw()
        finally:
            spent[0] += time.perf_counter() - start

    sampler.global_batch = timed_draw
    for _ in range(args.warmup_steps):
        trainer.train_step()
    spent[0] = 0.0
    t = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    out["step_ms"] = 1000 * (time.perf_counter() - t) / args.steps
    out["sampler_ms"] = 1000 * spent[0] / args.steps
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    platform.shutdown()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=1_000_000, help="documents over all shards")
    p.add_argument(
        "--domains",
        type=int,
        nargs="+",
        default=sorted(LEVELS),
        choices=sorted(LEVELS),
        help="fine-domain counts to measure",
    )
    p.add_argument("--dir", default=None, help="where the shards and maps go (kept; default a temporary directory)")
    p.add_argument("--model-args", default=MODEL_ARGS, help="model and batch flags of the training steps")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per K")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--map", help=argparse.SUPPRESS)
    p.add_argument("--prefixes", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-fine-domains-")
        args.dir = tmp.name
    os.makedirs(args.dir, exist_ok=True)
    print(f"writing {args.documents:,} documents to {args.dir} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    prefixes = write_corpus(args.dir, args.documents)
    print(f"  corpus ready in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for k in args.domains:
        map_path = write_map(os.path.join(args.dir, f"map_{k}.npz"), prefixes, LEVELS[k])
        print(f"K = {k:,}: measuring in a fresh process ...", file=sys.stderr, flush=True)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--map",
            map_path,
            "--prefixes",
            *prefixes,
            "--model-args",
            args.model_args,
            "--steps",
            str(args.steps),
            "--warmup-steps",
            str(args.warmup_steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        rows.append((k, json.loads(proc.stdout.strip().splitlines()[-1])))
    print(
        f"\nfine domains over {args.documents:,} documents (4 shards, 50-500 tokens each); os.cpu_count() = "
        f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; model: {args.model_args}"
    )
    head = (
        "| K | empty | start-up: map + index (s) | first batch (s) | cache hit (s) | peak RSS (GB) "
        "| step (ms) | sampler (ms) | sampler / step |"
    )
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for k, r in rows:
        print(
            f"| {k:,} | {r['empty_domains']:,} | {r['startup_s']:.2f} | {r['first_batch_s']:.3f} | "
            f"{r['cache_hit_s']:.2f} | {r['peak_rss_gb']:.2f} | {r['step_ms']:.0f} | {r['sampler_ms']:.2f} | "
            f"{100 * r['sampler_ms'] / r['step_ms']:.2f} % |"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
