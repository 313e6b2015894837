"""Seconds a checkpoint save stalls training: ours against a bare megatron ``dist_checkpointing.save``.

Ours (``training/resume.save_job``) = the finite-parameter check + building the sharded
state dict + ``dist_checkpointing.save`` into a scratch directory + a CRC-32 of every file
(split over the ranks) + the atomic publish (metadata, rename, tracker, retention). The
trainer's interval saves run the CRC-32s in a background thread and publish a few steps
later, so training stalls only for the part before (``ours, background``); ``ours,
blocking`` is the whole save, as the last save of a run does it. The bare save writes the
same sharded state dict with ``dist_checkpointing.save`` alone, as Megatron-LM's synchronous
torch_dist save does. The three alternate (median of --repeats); the background save's
publication is finished, untimed, before the next save starts.

    .venv/bin/python benchmarks/bench_checkpoint_save.py                  # one process, CPU
    torchrun --nproc-per-node 2 benchmarks/bench_checkpoint_save.py       # DP=2 (gloo or NCCL)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", default=None, help="scratch directory (default: <tmp>/bench_checkpoint_save, removed after)"
    )
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument(
        "--keep-last",
        type=int,
        default=1000,
        help="our retention (default: nothing deleted, like the bare save; 1 also times the deletion)",
    )
    args = parser.parse_args()

    from megatron.core import dist_checkpointing

    from megatron_dga import comm, platform
    from megatron_dga.training import resume
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer
    from tests.helpers.synthetic import NULL_TOKENIZER_ARGS, three_domain_shards

    # One path for all ranks (a per-rank temp dir would split the checkpoint).
    out = args.out or os.path.join(tempfile.gettempdir(), "bench_checkpoint_save")
    shards_dir = os.path.join(out, "shards")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out, ignore_errors=True)
        three_domain_shards(shards_dir)
    argv = [
        "--data-path",
        *[os.path.join(shards_dir, f"dom{i}_text_document") for i in range(3)],
        *NULL_TOKENIZER_ARGS,
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        "8",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        str(2 * int(os.environ.get("WORLD_SIZE", "1"))),
        "--train-iters",
        "1000",
        "--log-interval",
        "1000",
        "--eval-interval",
        "0",
        "--mixing",
        "uniform",
        "--save",
        os.path.join(out, "ours"),
        "--keep-last",
        str(args.keep_last),
        "--log-dir",
        os.path.join(out, "log"),
    ]
    if args.distributed_optimizer:
        argv.append("--use-distributed-optimizer")
    cfg = parse_args(argv)
    ctx = platform.initialize(cfg.parallel)
    comm.barrier()
    trainer = Trainer(cfg, ctx)
    trainer.train_step()  # optimizer state exists, as in a real save
    trainer.iteration = 1

    def ours_blocking():
        resume.save_job(trainer)
        trainer.iteration += 1

    pending = []

    def ours_background():
        pending.append(resume.save_job(trainer, background=True))
        trainer.iteration += 1

    def bare():
        # Kept, like ours with the default --keep-last here: both leave the same bytes behind.
        target = os.path.join(out, "bare", f"iter_{trainer.iteration:07d}")
        if comm.rank() == 0:
            os.makedirs(target)
        comm.barrier()
        with platform.megatron_cuda_calls_on_cpu():
            dist_checkpointing.save(resume.sharded_state(trainer, is_loading=False), target)
        trainer.iteration += 1

    methods = {"bare": bare, "ours, background": ours_background, "ours, blocking": ours_blocking}
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up: allocator, file system, imports
        fn()
        while pending:
            pending.pop().finish()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            comm.barrier()
            start = time.perf_counter()
            fn()
            comm.barrier()
            times[name].append(time.perf_counter() - start)
            while pending:  # what training would overlap with, untimed
                pending.pop().finish()
    if ctx.is_logging_rank:
        last_bare = os.path.join(out, "bare", sorted(os.listdir(os.path.join(out, "bare")))[-1])
        size = sum(os.path.getsize(os.path.join(last_bare, f)) for f in os.listdir(last_bare))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"checkpoint of {trainer.cfg.model.num_parameters():,} parameters + Adam state ({size / 2**20:.1f} MiB on disk), "
            f"{ctx.describe()}, median of {args.repeats}:"
        )
        for name, seconds in med.items():
            ratio = "" if name == "bare" else f"   ratio {seconds / med['bare']:.2f}x"
            print(f"  {name:<36}: {seconds:.3f} s{ratio}")
    platform.shutdown()
    if args.out is None and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
