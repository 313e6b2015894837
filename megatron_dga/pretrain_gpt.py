"""Entry point: ``torchrun ... -m megatron_dga.pretrain_gpt --data-path ... [flags]``.

Also installed as the console script ``megatron-dga-pretrain-gpt``. Configuration
errors are reported as one line naming the flag and the fix (exit code 2), before any
training work starts.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional, Sequence

from megatron_dga.errors import DGAError


def _quiet_known_warnings() -> None:
    # megatron-core warns at import that apex/TE are absent: expected on CPU, said once in the docs.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-bucket parameter listings
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
