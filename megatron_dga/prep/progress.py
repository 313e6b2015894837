"""Progress of long offline jobs: a tqdm bar on a terminal, periodic log lines otherwise.

The one progress helper of the preparation tools (preprocessing, tokenizer training,
embedding, clustering). On a terminal (stderr is a TTY) a tqdm bar; in a batch job or CI log,
where a bar is one endless line of carriage returns, one INFO line (logger
``megatron_dga.progress``) every ``log_every_s`` seconds, or every ``log_every`` documents,
with the count, the rate and the ETA. ``enabled=False`` (the tools' ``--no-progress``)
silences both; ``enabled=True`` shows the bar even without a terminal.

Work counted in bytes (``unit="B"``: reading input files, whose sizes give the total) can count
documents beside it (``update(nbytes, docs=n)``): the bar shows them as a postfix, the log lines
as documents/s next to MB/s.
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

        with Progress(total_bytes, "web", unit="B", log_every=10000) as bar:   # bytes read, and documents
            bar.update(len(raw_lines_bytes), docs=documents_in_them)
    """

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        unit: str = "doc",
        enabled: Optional[bool] = None,
        log_every_s: float = 10.0,
        log_every: Optional[int] = None,
    ):
        """
        Args:
            total: units expected (None: unknown, no percentage or ETA).
            desc: what is counted, the line's or bar's label.
            unit: ``doc``, ``node``, ... or ``B`` (bytes: scaled by 1024 in the bar, MB in the lines).
            enabled: None: a bar on a terminal, log lines otherwise; True: always the bar; False: nothing.
            log_every_s: seconds between log lines.
            log_every: documents between log lines instead (tools' ``--log-interval``).
        """
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every {log_every} must be >= 1")
        self.total, self.desc, self.unit = total, desc, unit
        self.count = 0
        self.docs = 0
        self.start = time.monotonic()
        self._every_s, self._every = log_every_s, log_every
        self._next_log = log_every if log_every is not None else self.start + log_every_s
        self._log = enabled is not False
        self.bar = None
        if enabled is True or (enabled is None and sys.stderr.isatty()):
            from tqdm import tqdm

            kw = {"unit_divisor": 1024} if unit == "B" else {}
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, mininterval=0.5, **kw)
            self._log = False

    def update(self, n: int, docs: Optional[int] = None) -> None:
        """``n`` more units done (and ``docs`` more documents, when the unit is not documents)."""
        self.count += n
        self.docs += n if docs is None else docs
        if self.bar is not None:
            self.bar.update(n)
            if docs is not None:
                rate = self.docs / max(self.elapsed, 1e-9)
                self.bar.set_postfix(docs=self.docs, docs_s=f"{rate:.0f}", refresh=False)
            return
        if not self._log:
            return
        if self._every is not None:
            if self.docs >= self._next_log:
                self._next_log = (self.docs // self._every + 1) * self._every
                logger.info("%s", self.line())
        else:
            now = time.monotonic()
            if now >= self._next_log:
                self._next_log = now + self._every_s
                logger.info("%s", self.line())

    def line(self) -> str:
        """The log line: count, share of the total, rates, ETA."""
        elapsed = max(self.elapsed, 1e-9)
        rate = self.count / elapsed
        scale, unit = (1e6, "MB") if self.unit == "B" else (1.0, f"{self.unit}s")
        done = f"{self.count / scale:.{1 if scale > 1 else 0}f}"
        text = f"{self.desc}: "
        if self.unit == "B":
            text += f"{self.docs} documents, "
        if self.total:
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            text += (
                f"{done}/{self.total / scale:.{1 if scale > 1 else 0}f} {unit} "
                f"({100.0 * self.count / self.total:.1f}%), "
            )
        else:
            text += f"{done} {unit}, "
        if self.unit == "B":
            text += f"{self.docs / elapsed:.0f} documents/s, "
        text += f"{rate / scale:.{2 if scale > 1 else 0}f} {unit}/s"
        return text + (f", ETA {eta:.0f} s" if self.total else "")

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
