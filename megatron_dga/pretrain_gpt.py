"""Entry point: ``torchrun ... -m megatron_dga.pretrain_gpt --data-path ... [flags]``.

Also installed as the console script ``megatron-dga-pretrain-gpt``. Configuration
errors are reported as one line naming the flag and the fix (exit code 2), before any
training work starts.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()  # before megatron-core is imported: its known CPU warnings are filtered
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args

    try:
        cfg = parse_args(argv)
        ctx = platform.initialize(cfg.parallel)
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from megatron_dga.training.trainer import Trainer

        Trainer(cfg, ctx).train()
    except DGAError as exc:
        print(f"error (rank {ctx.rank}): {exc}", file=sys.stderr)
        return 2
    finally:
        platform.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
