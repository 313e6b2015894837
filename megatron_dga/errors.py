"""Errors users see. Each message names the offending flag/file/value and the fix."""


class DGAError(Exception):
    """Base class of every error megatron-dga raises on purpose."""


class ConfigError(DGAError, ValueError):
    """A configuration value (CLI flag, YAML key, dataclass field) is invalid."""


class DataError(DGAError, ValueError):
    """An input file (shard, jsonl, weights file, tokenizer) is missing or malformed."""


class NumericalError(DGAError, FloatingPointError):
    """A computation produced NaN/Inf; the state it would have updated is left unchanged."""


class CheckpointError(DGAError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run."""


class OutputError(DGAError, OSError):
    """An output (checkpoint, log, shard, tool output) cannot be written: no space left,
    permission denied, read-only file system, a file where a directory should be. Still an
    ``OSError`` (``errno`` is the original one), so ``except OSError`` keeps catching it."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror: filename"
        return str(self.args[0]) if self.args else ""
