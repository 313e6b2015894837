"""When a run stops before --train-iters: --exit-interval, a signal, a wall-clock budget.

A preempted job (SLURM sends SIGTERM, then SIGKILL after a grace period) must not lose
the work since its last save. With --exit-signal-handler, SIGTERM and SIGINT only set a
flag; the loop finishes the current step, every rank agrees (one all-reduce of two
floats per step, only when a signal handler or a time budget is on), a checkpoint is
saved and the job exits 0. --exit-duration-in-mins does the same when the wall-clock
budget since start-up is spent.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator, Optional

import torch

from megatron_dga import comm


class StopConditions:
    """Decides after each step whether to save and stop, identically on every rank."""

    def __init__(self, schedule_cfg, device):
        self.cfg = schedule_cfg
        self.device = device
        self.start = time.monotonic()
        self.received: Optional[int] = None
        self._previous = {}
        if schedule_cfg.exit_signal_handler:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        del frame
        self.received = signum

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (None: go on); the same answer on every rank."""
        cfg = self.cfg
        if cfg.exit_signal_handler or cfg.exit_duration_in_mins:
            over_time = bool(cfg.exit_duration_in_mins) and (
                time.monotonic() - self.start >= 60.0 * cfg.exit_duration_in_mins
            )
            flags = torch.tensor([float(self.received or 0), float(over_time)], device=self.device)
            comm.all_reduce(flags, op=comm.MAX)
            received, over_time = flags.tolist()  # one host read per step (Megatron's signal handler: one too)
            if received > 0:
                return f"received {signal.Signals(int(received)).name} (--exit-signal-handler)"
            if over_time > 0:
                return f"--exit-duration-in-mins {cfg.exit_duration_in_mins} reached"
        if cfg.exit_interval and iteration % cfg.exit_interval == 0:
            return f"--exit-interval {cfg.exit_interval}"
        return None


@contextlib.contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT without --exit-signal-handler) back until the block is done.

    A checkpoint save forks writer processes (megatron's torch_dist writer). A KeyboardInterrupt
    raised in the parent's after-fork hooks is printed as "Exception ignored" and dropped: the run
    went on past Ctrl-C with the logging lock held, and hung at a later save. Inside this block a
    SIGINT is only recorded; it is raised as KeyboardInterrupt once the save is complete, so the
    message after Ctrl-C names that checkpoint. With --exit-signal-handler (our handler, not
    Python's default) or off the main thread nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
