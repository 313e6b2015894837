"""Progress of long offline jobs: a tqdm bar on a terminal, periodic log lines otherwise.

On a terminal (stderr is a TTY) a tqdm bar; in a batch job or CI log, where a bar is one
endless line of carriage returns, one INFO line every ``log_every_s`` seconds with the count,
the rate and the ETA. ``enabled=False`` silences both.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

logger = logging.getLogger("megatron_dga.progress")


class Progress:
    """Counts ``unit``s towards ``total`` and reports them (see the module docstring).

    Usage::

        with Progress(n, "embed", unit="doc") as bar:
            for chunk in chunks:
                ...
                bar.update(len(chunk))
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "doc", enabled: Optional[bool] = None,
                 log_every_s: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self.start = time.monotonic()
        self._next_log = self.start + log_every_s
        self._every = log_every_s
        self._log = enabled is not False
        self.bar = None
        if enabled is not False and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=0.5)
            self._log = False

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self._log and now >= self._next_log:
            self._next_log = now + self._every
            logger.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            return (f"{self.desc}: {self.count}/{self.total} {self.unit}s ({100.0 * self.count / self.total:.1f}%), "
                    f"{rate:.0f} {self.unit}s/s, ETA {eta:.0f} s")
        return f"{self.desc}: {self.count} {self.unit}s, {rate:.0f} {self.unit}s/s"

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
