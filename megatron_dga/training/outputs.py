"""Where a training run writes, decided and checked before any work: --save, --log-dir, --tensorboard-dir,
--data-cache-path.

:func:`prepare_outputs` runs first thing at Trainer start, before any dataset, model or optimizer
is built, so a read-only, full or mistyped output location costs seconds, not a training run:

* the log directory is --log-dir, else --save, else a new ``runs/<YYYYmmdd-HHMMSS>-<8 hex>`` for
  every run (two runs started in the same directory never share one; where it goes is printed).
  The logging rank names it and every rank receives it, so all ranks agree;
* each location is created if missing and probed (a file created, written, removed) by the rank
  that writes there: --save and --data-cache-path by rank 0 (the checkpoint coordinator, and
  the rank that builds megatron's index cache), the log, TensorBoard and W&B (--wandb-save-dir)
  directories by the logging rank;
* rank 0 takes --save's writer lock (``training/save_lock.py``): a second run saving into the same
  directory is refused here;
* one all-gather of (errors, log directory) spreads any failure: every rank raises the same
  ConfigError naming each failing flag, instead of one rank failing and the others hanging.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import List, Tuple

from megatron_dga import comm
from megatron_dga.errors import ConfigError
from megatron_dga.fileio import ensure_writable_dir
from megatron_dga.platform import ParallelContext
from megatron_dga.training import save_lock
from megatron_dga.training.config import PretrainConfig
from megatron_dga.training.metrics import console_print

DEFAULT_LOG_ROOT = "runs"
"""Parent of the per-run default log directories (relative to the working directory)."""


def default_log_dir() -> str:
    """A new per-run directory name: start time (sortable) and a random suffix (unique)."""
    return os.path.join(DEFAULT_LOG_ROOT, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")


def prepare_outputs(cfg: PretrainConfig, ctx: ParallelContext) -> str:
    """Resolve the log directory and check every output location; call on every rank.

    Returns:
        The log directory (identical on every rank).

    Raises:
        ConfigError: on every rank when any location cannot be written, naming each flag, the
            path and the cause.
    """
    save, log_dir = cfg.checkpoint.save, None
    checks: List[Tuple[str, str]] = []
    if ctx.is_logging_rank:
        if cfg.logging.log_dir:
            log_dir, flag = cfg.logging.log_dir, "--log-dir"
        elif save:
            log_dir, flag = save, "--save"  # same message as rank 0's check of --save: reported once
        else:
            log_dir, flag = default_log_dir(), "--log-dir (default)"
        checks.append((log_dir, flag))
        if cfg.logging.tensorboard_dir:
            checks.append((cfg.logging.tensorboard_dir, "--tensorboard-dir"))
        if cfg.logging.wandb_save_dir:
            checks.append((cfg.logging.wandb_save_dir, "--wandb-save-dir"))
    if ctx.rank == 0 and save:
        checks.append((save, "--save"))
    if ctx.rank == 0 and cfg.data.data_cache_path:  # megatron writes the index cache on rank 0
        checks.append((cfg.data.data_cache_path, "--data-cache-path"))
    errors = []
    for directory, flag in checks:
        try:
            ensure_writable_dir(directory, flag)
        except ConfigError as exc:
            errors.append(str(exc))
    if ctx.rank == 0 and save and not errors:  # one writer per --save (training/save_lock.py)
        try:
            save_lock.acquire(save)
        except ConfigError as exc:
            errors.append(str(exc))
    records = comm.all_gather_object((errors, log_dir))
    failed = list(dict.fromkeys(msg for errs, _ in records for msg in errs))
    if failed:
        raise ConfigError("; ".join(failed))
    log_dir = next(d for _, d in records if d is not None)  # the logging rank's
    if ctx.is_logging_rank and not (cfg.logging.log_dir or save):
        console_print(f"logging to {log_dir} (a new directory per run; choose one with --log-dir)")
    return log_dir
