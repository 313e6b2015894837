"""Start-up logging of the trainer and every tool: what matters, without known third-party noise.

Each entry point (``megatron_dga.pretrain_gpt`` and every script in ``tools/``) calls
:func:`setup_logging` first, before megatron-core is imported, so the one useful line (an
error, a skipped-lines report) is not buried under messages that say nothing about the run:

* megatron-core warns at import, once per module, that Transformer Engine and Apex are not
  installed. Both are optional GPU extras (README, Troubleshooting); on CPU that is expected.
* megatron-core's Megatron-FSDP package logs INFO lines at import ("Using Megatron-FSDP without
  Transformer Engine", "Detected Megatron Core, ..."); we never use FSDP. Its other INFO lines
  (per-bucket parameter listings, dataset sample counts) are silenced with it: megatron's
  loggers show warnings and errors only.
* megatron-core's GPTDataset warns "Unable to save GPTDataset indexes because path_to_cache is
  None" once per dataset it builds: twice per domain (train and held-out split), i.e. hundreds
  of identical lines for a fine-grained mixture. Building the indices in memory is our default
  (--data-cache-path DIR caches them, as in Megatron), so the first one is replaced by one line
  saying so and the rest are dropped.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_HARMLESS_WARNINGS = (
    ".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*",
    ".*full scope is deprecated.*",
)
"""Regexes of ``warnings`` messages ignored process-wide (see the module docstring)."""

_GPT_DATASET_LOGGER = "megatron.core.datasets.gpt_dataset"
_NO_CACHE_MESSAGE = "because path_to_cache is None"


class _IndexCacheNotice(logging.Filter):
    """Let the first "Unable to save GPTDataset indexes" warning through, reworded; drop the rest."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if _NO_CACHE_MESSAGE not in record.getMessage():
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        record.msg, record.args = (
            "megatron-core builds each domain's GPTDataset sample indices in memory (--data-cache-path DIR "
            "would cache them); said once for all domains",
            None,
        )
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_known_warnings() -> None:
    """Ignore :data:`KNOWN_HARMLESS_WARNINGS` (idempotent); call before megatron-core is imported."""
    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(level: int = logging.INFO, fmt: str = "%(message)s") -> None:
    """Configure logging for an entry point (idempotent): root handler, megatron's noise filtered.

    Args:
        level: root level (the tools' progress lines are INFO).
        fmt: root format, e.g. ``"%(asctime)s %(levelname)s %(message)s"`` for long-running tools.
    """
    quiet_known_warnings()
    logging.basicConfig(level=level, format=fmt)
    # Warnings and errors only, from every megatron logger (FSDP's import-time INFO lines, the
    # per-bucket parameter listings, the datasets' sample counts).
    logging.getLogger("megatron").setLevel(logging.WARNING)
    dataset_logger = logging.getLogger(_GPT_DATASET_LOGGER)
    if not any(isinstance(f, _IndexCacheNotice) for f in dataset_logger.filters):
        dataset_logger.addFilter(_IndexCacheNotice())
