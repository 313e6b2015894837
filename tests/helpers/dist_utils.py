"""Run a test function on N processes over gloo (CPU), like torchrun would.

    results = run_distributed(fn, world_size=2, args=(x,))

`fn(rank, world_size, *args)` runs in a fresh spawned process with MASTER_ADDR/PORT,
RANK, WORLD_SIZE, LOCAL_RANK set; each rank's return value comes back in rank order.
Return plain picklable values (numpy arrays, not torch tensors: torch passes tensors
through shared memory that disappears when the rank exits).
An exception on any rank fails the caller with that rank's traceback.

The ranks never see a GPU (CUDA_VISIBLE_DEVICES is empty in their environment before
torch starts in them): these are the CPU-semantics tests, gloo and the local layer spec,
on a GPU node as on CI. GPU tests run in the test process itself (``tests/gpu``).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


WORKER_ENV = {"CUDA_VISIBLE_DEVICES": ""}
"""Set in the environment the spawned ranks start with (inherited at ``Process.start``)."""


REPORT_TIMEOUT = 1200.0
"""Longest wait for a rank's result (the suite's per-test limit, pytest-timeout's 600 s, comes first)."""


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0):
    """Run fn(rank, world_size, *args) on world_size spawned ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results, errors = {}, []
    for _ in range(world_size):
        try:  # never wait forever: a rank that died before reporting (or hangs) fails the test
            rank, ok, value = queue.get(timeout=REPORT_TIMEOUT)
        except Exception:
            missing = sorted(set(range(world_size)) - set(results))
            errors.append(
                f"ranks {missing} reported nothing within {REPORT_TIMEOUT:.0f} s (died or hung); exit codes "
                f"{[p.exitcode for p in procs]}"
            )
            break
        if ok:
            results[rank] = value
        else:
            errors.append(f"rank {rank} failed:\n{value}")
            break
    for p in procs:
        p.join(timeout=timeout if not errors else 5)
        if p.is_alive():
            p.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _pretrain_rank(rank, world_size, argv):
    from megatron_dga.pretrain_gpt import main
    from megatron_dga.training.metrics import read_metrics

    rc = main(argv)
    log_dir = argv[argv.index("--log-dir") + 1]
    metrics = read_metrics(os.path.join(log_dir, "metrics.jsonl")) if rank == world_size - 1 and rc == 0 else None
    return rc, metrics


def run_pretrain(argv, world_size: int = 1):
    """``megatron_dga.pretrain_gpt.main(argv)`` on world_size gloo ranks: (exit codes, last rank's metrics)."""
    results = run_distributed(_pretrain_rank, world_size=world_size, args=(list(argv),))
    return [rc for rc, _ in results], results[-1][1]


def _train_rank(rank, world_size, runs):
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.metrics import read_metrics
    from megatron_dga.training.trainer import Trainer

    out = {}
    for name, argv in runs.items():
        cfg = parse_args(argv)
        trainer = Trainer(cfg, platform.initialize(cfg.parallel))
        trainer.train()
        log_dir = argv[argv.index("--log-dir") + 1]
        out[name] = {
            "metrics": read_metrics(os.path.join(log_dir, "metrics.jsonl")) if trainer.ctx.is_logging_rank else None,
            "params": [p.detach().float().numpy().copy() for p in trainer.params],
        }
    platform.shutdown()
    return out


def run_trainers(runs: dict, world_size: int = 1) -> dict:
    """Train each ``{name: argv}`` in turn on the same gloo ranks: one spawn, one start-up for all.

    Returns ``{name: {"metrics": the logging rank's metrics.jsonl entries, "params": [per rank, its
    trainable parameters after train()]}}``.
    """
    ranks = run_distributed(_train_rank, world_size=world_size, args=(dict(runs),))
    return {
        name: {
            "metrics": next(r[name]["metrics"] for r in ranks if r[name]["metrics"] is not None),
            "params": [r[name]["params"] for r in ranks],
        }
        for name in runs
    }
