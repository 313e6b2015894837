"""Entry point: ``torchrun ... -m megatron_dga.pretrain_gpt --data-path ... [flags]``.

Also installed as the console script ``megatron-dga-pretrain-gpt``. Configuration
errors are reported as one line naming the flag and the fix (exit code 2), before any
training work starts. Ctrl-C (SIGINT) without --exit-signal-handler stops the run where
it is, with one line naming the iteration and the last checkpoint, and exit code 130
(128 + SIGINT, as a shell reports a process stopped by Ctrl-C); with the flag the run
saves first and exits 0.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C without --exit-signal-handler (128 + SIGINT)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()  # before megatron-core is imported: its known CPU warnings are filtered
    from megatron_dga import platform
    from megatron_dga.training import save_lock
    from megatron_dga.training.arguments import parse_args

    cfg = ctx = trainer = None
    try:
        try:
            cfg = parse_args(argv)
            ctx = platform.initialize(cfg.parallel)
        except DGAError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            from megatron_dga.training.trainer import Trainer

            trainer = Trainer(cfg, ctx)
            trainer.train()
        except DGAError as exc:
            print(f"error (rank {ctx.rank}): {exc}", file=sys.stderr)
            return 2
        finally:
            save_lock.release_all()  # the --save writer lock (also released at exit)
            platform.shutdown()
    except KeyboardInterrupt:
        if ctx is None or ctx.is_logging_rank:
            print(interrupted_message(cfg, trainer), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def interrupted_message(cfg, trainer) -> str:
    """One line after Ctrl-C: where the run stopped, its last checkpoint, how to save on a signal."""
    if trainer is None:
        where = "interrupted before training started"
    else:
        where = f"interrupted at iteration {trainer.iteration}"
    save = cfg.checkpoint.save if cfg is not None else None
    if save:
        from megatron_dga.training.checkpoint import latest_iteration

        try:
            last = latest_iteration(save)
        except DGAError:
            last = None
        kept = (
            f"the last checkpoint is iteration {last} under --save {save} (resume with --load {save})"
            if last is not None
            else f"no checkpoint was saved under --save {save}"
        )
    else:
        kept = "nothing was saved (no --save)"
    if cfg is not None and cfg.schedule.exit_signal_handler:
        hint = "--exit-signal-handler saves on Ctrl-C/SIGTERM once training has started"
    else:
        hint = "pass --exit-signal-handler (with --save) to save a checkpoint on Ctrl-C/SIGTERM before exiting"
    return f"{where}; {kept}; {hint}"


if __name__ == "__main__":
    sys.exit(main())
