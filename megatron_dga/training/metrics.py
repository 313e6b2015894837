"""One path for training metrics: console line, TensorBoard scalars, metrics.jsonl, W&B.

The trainer calls :meth:`MetricsLogger.log` with a flat dict of values; the logger
fans them out to up to four sinks:

* a Megatron-style console line (scalar values only; lists are not printed)::

      [2026-11-03 10:00:00] iteration      100/    1000 | consumed samples:         3200 |
      elapsed time per iteration (ms): 123.4 | tokens/s: 12345 | learning rate: 3.000000E-04 |
      lm loss: 3.456789E+00 | grad norm: 1.234 |

* TensorBoard scalars with namespaced tags (:data:`TENSORBOARD_TAGS`); a list value
  expands to one scalar per domain, ``<prefix>/<domain name>`` (e.g.
  ``domain_weights`` -> ``mixing/weight/<domain>``);
* per-domain lists longer than ``list_limit`` (--log-domains-limit; thousands of fine domains)
  are summarised on every sink instead (:func:`summarize_list`): metrics.jsonl gets a dict
  ``{"summary": true, "count", "nonzero", "min", "max", "mean", "top": [[name, value] x 10]}``,
  for distributions (weights, samples) also ``entropy``, ``effective_domains`` = exp(entropy)
  and ``mass_by_cluster`` (per top-level cluster of a hierarchical domain map); TensorBoard and
  W&B get summary scalars ``<prefix>_<statistic>`` only (e.g. ``mixing/weight_entropy``,
  ``mixing/weight_top1``), never one scalar per domain;
* ``<log_dir>/metrics.jsonl``: one JSON object per :meth:`log` call,
  ``{"iteration": N, **values}``, flushed line by line. Non-finite floats are
  written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (strict JSON has
  no such numbers) and :func:`read_metrics` turns them back into floats;
* Weights & Biases (--wandb-project, the optional ``wandb`` client): the TensorBoard
  scalars, same tags, same per-domain expansion of lists, one ``wandb.log`` per call
  at ``step=iteration``. ``WANDB_MODE=offline`` writes the run under --wandb-save-dir
  without a network (``wandb sync`` uploads it later). W&B cannot drop a crashed run's
  steps: a resumed run is a new W&B run starting at the resumed iteration.

Resume rule: a logger built with ``start_iteration=S > 0`` (a run resumed from the
checkpoint of iteration S) keeps only the existing ``metrics.jsonl`` entries with
``iteration <= S`` (and drops torn/unparsable lines), because entries past the checkpoint
came from a run that crashed and are about to be recomputed. The original file is kept as
``metrics.jsonl.bak`` when anything is dropped. TensorBoard gets the same rule through
``SummaryWriter(purge_step=S + 1)``.

A fresh run (``S = 0``) never overwrites another run's logs: when the directory already
holds a ``metrics.jsonl`` with entries, that file, its ``.bak`` and the ``run_info.json``
beside it are moved, together, to ``previous_runs/<time of its last entry>/`` in the same
directory (still a run directory ``tools/plot_metrics.py`` reads), with one warning line,
and the new run starts an empty ``metrics.jsonl``. This is Megatron's spirit (a rerun
appends to its TensorBoard directory and loses nothing) without interleaving two runs'
iterations in one file. TensorBoard event files are never moved or deleted; each run
writes its own.

Only the writer rank (``is_writer=True``) touches files or prints; on other ranks
every method is a no-op, so all ranks can call the same code.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from megatron_dga.errors import ConfigError, DataError, OutputError
from megatron_dga.fileio import atomic_write_text, output_error
from megatron_dga.mixing.metrics import TENSORBOARD_TAGS as MIXING_TAGS

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
RUN_INFO_FILENAME = "run_info.json"
"""Written beside metrics.jsonl by the trainer (domain names, config)."""
PREVIOUS_RUNS_DIRNAME = "previous_runs"
"""Where a fresh run moves an earlier run's files found in its log directory (module docstring)."""

TENSORBOARD_TAGS: Mapping[str, str] = {
    "lm_loss": "train/lm_loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec",
    "ms_per_iter": "train/ms_per_iter",
    "consumed_samples": "train/consumed_samples",
    "consumed_tokens": "train/consumed_tokens",
    "global_batch_size": "train/global_batch_size",
    "loss_scale": "train/loss_scale",
    "skipped_iterations": "train/skipped_iterations",
    "domain_train_loss": "train/domain_loss",
    **MIXING_TAGS,  # the mixing strategies' keys (mixing/metrics.py)
    "domain_epochs": "data/epochs",
    "domain_samples": "data/samples",
    "specific_eval_loss": "eval/specific_loss",
    "domain_eval_loss": "eval/domain_loss",
}
"""Metric key -> TensorBoard tag (scalars) or tag prefix (lists, one tag per domain).
Keys not listed map to ``train/<key>``, or to the key itself if it contains a ``/``."""

DISTRIBUTION_KEYS = frozenset({"domain_weights", "domain_samples", "basis_weights"})
"""List metrics that are distributions over the domains (normalised in summaries: entropy, cluster mass)."""
SUMMARY_TOP = 10
"""Largest entries named in a summarised list."""
_SUMMARY_SCALARS = {True: ("entropy", "effective_domains", "top1", "nonzero"), False: ("min", "max", "mean", "nonzero")}
"""TensorBoard/W&B scalars of a summary, for distributions (True) and other lists (False)."""

# (key, console label, format) in the order Megatron prints them; other scalar keys
# follow in the caller's order as "<key with spaces>: <value>".
_CONSOLE_FIELDS: Sequence[tuple[str, str, str]] = (
    ("consumed_samples", "consumed samples", "{:12d}"),
    ("consumed_tokens", "consumed tokens", "{:14d}"),
    ("ms_per_iter", "elapsed time per iteration (ms)", "{:.1f}"),
    ("tokens_per_sec", "tokens/s", "{:.0f}"),
    ("lr", "learning rate", "{:.6E}"),
    ("global_batch_size", "global batch size", "{:5d}"),
    ("lm_loss", "lm loss", "{:.6E}"),
    ("loss_scale", "loss scale", "{:.1f}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("skipped_iterations", "number of skipped iterations", "{:3d}"),
    ("specific_eval_loss", "specific eval loss", "{:.6E}"),
)
_CONSOLE_KEYS = {key for key, _, _ in _CONSOLE_FIELDS}

_NONFINITE_TO_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def console_print(line: str, stream: Optional[TextIO] = None) -> None:
    """The trainer's console lines (the progress line, start, save, resume and exit), as Megatron prints them:
    stdout, flushed, called on the logging rank only. Everything else in the library logs through ``logging``."""
    print(line, file=stream or sys.stdout, flush=True)


def _plain(value: Any, key: str) -> Any:
    """Turn tensors/NumPy values into plain Python, recursively; reject the rest."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _plain(value.tolist(), key)
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, key) for k, v in value.items()}
    raise ConfigError(
        f"metric {key!r} has a value of type {type(value).__name__}; use numbers, lists of "
        "numbers, strings, tensors or NumPy arrays"
    )


def _encode(value: Any) -> Any:
    """Replace non-finite floats by their string tokens (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else _NONFINITE_TO_STR[value]
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _STR_TO_NONFINITE:
        return _STR_TO_NONFINITE[value]
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a metrics.jsonl file written by :class:`MetricsLogger`.

    A torn last line (a crash mid-write) is skipped with a warning; non-finite
    tokens (``"NaN"``, ``"Infinity"``, ``"-Infinity"``) come back as floats.

    Args:
        path: The ``metrics.jsonl`` file, or the log directory holding it.

    Returns:
        One dict per logged iteration, in file order.

    Raises:
        DataError: The file is missing, or a line other than the last is not a JSON object.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"metrics file {path} does not exist; pass the --log-dir of a run") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):
                logger.warning("%s: skipping torn last line %d (%s)", path, number, exc)
                continue
            raise DataError(f"{path}:{number} is not a JSON object ({exc}): {line[:80]!r}") from exc
        records.append(_decode(record))
    return records


def read_tensorboard(tb_dir: str | os.PathLike, labels: Optional[Sequence[str]] = None) -> list[dict]:
    """Metrics back from TensorBoard event files, in the shape :func:`read_metrics` returns.

    Inverts :data:`TENSORBOARD_TAGS`: ``train/lm_loss`` -> ``lm_loss``, and the per-domain tags
    ``mixing/weight/<name>`` -> ``domain_weights`` as a list ordered like ``labels`` (sorted names
    when not given). Unknown tags keep their tag as the key.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise DataError(f"{tb_dir}: no TensorBoard scalars found (give a run's --tensorboard-dir)")
    by_base = {tag: key for key, tag in TENSORBOARD_TAGS.items()}
    rows: dict[int, dict] = {}
    lists: dict[str, dict[int, dict[str, float]]] = {}
    for tag in tags:
        head, _, label = tag.rpartition("/")
        for event in acc.Scalars(tag):
            if tag in by_base or head not in by_base:
                key = by_base.get(tag, tag[len("train/") :] if tag.startswith("train/") else tag)
                rows.setdefault(event.step, {"iteration": event.step})[key] = event.value
            else:
                lists.setdefault(by_base[head], {}).setdefault(event.step, {})[label] = event.value
    for key, steps in lists.items():
        for step, values in steps.items():
            order = list(labels) if labels and set(labels) >= set(values) else sorted(values)
            rows.setdefault(step, {"iteration": step})[key] = [values.get(name) for name in order]
    return [rows[step] for step in sorted(rows)]


def _truncate_after(path: Path, start_iteration: int) -> int:
    """Keep entries with iteration <= start_iteration; return how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record["iteration"]) <= start_iteration
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))  # readers see old or truncated
    return dropped


def _keep_previous_run(log_dir: Path) -> Optional[Path]:
    """Move an earlier run's metrics.jsonl (+ .bak, run_info.json) to previous_runs/<stamp>/.

    Returns the new directory, or None when there was no earlier run (no file, or an empty one).
    """
    metrics = log_dir / METRICS_FILENAME
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(metrics.stat().st_mtime))
    parent = log_dir / PREVIOUS_RUNS_DIRNAME
    parent.mkdir(exist_ok=True)
    target = parent / stamp
    while True:  # a new directory, never one holding another earlier run
        try:
            target.mkdir()
            break
        except FileExistsError:
            target = parent / f"{stamp}-{uuid.uuid4().hex[:6]}"
    for name in (METRICS_FILENAME, METRICS_FILENAME + ".bak", RUN_INFO_FILENAME):
        if (log_dir / name).is_file():
            os.replace(log_dir / name, target / name)
    return target


def summarize_list(
    values,
    labels: Optional[Sequence[str]] = None,
    distribution: bool = False,
    clusters: Optional[Any] = None,
    cluster_names: Optional[Sequence[str]] = None,
) -> dict:
    """A JSON summary of a long per-domain list (see the module docstring).

    Args:
        values: the numbers, one per domain (non-finite entries are counted and left out).
        labels: the domains' names (default: their positions), for the top entries.
        distribution: also the entropy (nats) of ``values / sum(values)``, exp(entropy) and, with
            ``clusters``, the normalised mass of every cluster.
        clusters: int (len(values),): each domain's cluster (top-level cluster of a domain map).
        cluster_names: names of the clusters.
    """
    import numpy as np

    v = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(v)
    x = np.where(finite, v, 0.0)
    out: dict = {"summary": True, "count": int(v.size), "nonzero": int(np.count_nonzero(x))}
    if not finite.all():
        out["non_finite"] = int(v.size - np.count_nonzero(finite))
    if finite.any():
        out.update(min=float(v[finite].min()), max=float(v[finite].max()), mean=float(v[finite].mean()))
    k = min(SUMMARY_TOP, int(finite.sum()))
    top = np.argpartition(np.where(finite, -v, np.inf), k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
    top = top[np.lexsort((top, -v[top]))]  # largest first, ties by position
    out["top"] = [[labels[i] if labels is not None else str(i), float(v[i])] for i in top.tolist()]
    if distribution:
        total = float(x[x > 0].sum())
        if total > 0:
            p = np.where(x > 0, x, 0.0) / total
            nz = p[p > 0]
            entropy = float(-(nz * np.log(nz)).sum())
            out.update(entropy=entropy, effective_domains=float(np.exp(entropy)))
            if clusters is not None:
                mass = np.bincount(
                    np.asarray(clusters), weights=p, minlength=len(cluster_names) if cluster_names is not None else 0
                )
                names = cluster_names if cluster_names is not None else [str(c) for c in range(mass.size)]
                out["mass_by_cluster"] = {names[c]: float(m) for c, m in enumerate(mass.tolist())}
    return out


def _summary_scalars(summary: Mapping[str, Any], distribution: bool) -> list[tuple[str, float]]:
    """The (statistic, value) pairs of a summary that TensorBoard/W&B receive."""
    pairs = []
    for stat in _SUMMARY_SCALARS[distribution]:
        value = summary["top"][0][1] if stat == "top1" and summary["top"] else summary.get(stat)
        if _is_number(value):
            pairs.append((stat, float(value)))
    return pairs


@dataclass(frozen=True)
class ThroughputWindow:
    """Speed over the iterations since the previous :meth:`Throughput.window` call."""

    iterations: int
    """Iterations counted in the window."""
    tokens: int
    """Tokens processed in the window (global, all data-parallel ranks)."""
    samples: int
    """Samples processed in the window."""
    seconds: float
    """Wall-clock seconds the window spans."""

    @property
    def ms_per_iter(self) -> float:
        return 1000.0 * self.seconds / self.iterations if self.iterations else math.nan

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


class Throughput:
    """Counts iterations/tokens between log calls and reports their rate.

    On GPU, synchronise the device before :meth:`window` (or time with events):
    this class only reads a host clock.

    Args:
        clock: Returns seconds; injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Start a new window now (e.g. after evaluation or checkpointing, to exclude them)."""
        self._restart(self._clock())

    def _restart(self, now: float) -> None:
        self._start = now
        self._iterations = 0
        self._tokens = 0
        self._samples = 0

    def step(self, tokens: int, samples: int = 0, iterations: int = 1) -> None:
        """Record ``iterations`` finished training iterations that consumed ``tokens``/``samples``."""
        self._iterations += iterations
        self._tokens += int(tokens)
        self._samples += int(samples)

    def window(self) -> ThroughputWindow:
        """Return the current window's totals and start a new window."""
        now = self._clock()
        result = ThroughputWindow(self._iterations, self._tokens, self._samples, now - self._start)
        self._restart(now)
        return result


class MetricsLogger:
    """Writes each iteration's metrics to the console, TensorBoard, metrics.jsonl and W&B.

    Args:
        log_dir: Directory of ``metrics.jsonl`` (created).
        tensorboard_dir: TensorBoard event directory; None disables TensorBoard.
        is_writer: Whether this rank writes; False makes every method a no-op.
        log_interval: Console/file logging period in iterations (see :meth:`should_log`).
        train_iters: Total iterations, printed as ``iteration   N/ total``; None omits it.
        start_iteration: Iteration the run starts from (the loaded checkpoint's, 0 for
            a fresh run); later entries of a crashed run are dropped (module docstring).
        domain_names: Labels of list-valued metrics (one per domain).
        list_labels: Per-key labels overriding ``domain_names`` (e.g. bases for DGA over bases).
        list_limit: Lists longer than this are summarised (--log-domains-limit); None never.
        domain_clusters: int (k,): each domain's top-level cluster (hierarchical domain map), for the
            per-cluster mass in summaries of lists over the domains.
        cluster_names: names of those clusters.
        stream: Console stream; default ``sys.stdout``.
        timestamps: Prefix console lines with ``[YYYY-mm-dd HH:MM:SS]`` like Megatron.
        wandb_init: Keyword arguments of ``wandb.init`` (``project``, ``name``, ``dir``,
            ``config``); None disables W&B. Needs the ``wandb`` package (``pip install
            'megatron-dga[wandb]'``).

    Raises:
        ConfigError: ``wandb_init`` given and the ``wandb`` package missing, or ``wandb.init``
            failing (not logged in and not offline); on the writer rank only.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        tensorboard_dir: Optional[str | os.PathLike] = None,
        *,
        is_writer: bool = True,
        log_interval: int = 1,
        train_iters: Optional[int] = None,
        start_iteration: int = 0,
        domain_names: Optional[Sequence[str]] = None,
        list_labels: Optional[Mapping[str, Sequence[str]]] = None,
        stream: Optional[TextIO] = None,
        timestamps: bool = True,
        wandb_init: Optional[Mapping[str, Any]] = None,
        list_limit: Optional[int] = None,
        domain_clusters: Optional[Any] = None,
        cluster_names: Optional[Sequence[str]] = None,
    ):
        if not isinstance(log_interval, int) or log_interval < 1:
            raise ConfigError(f"--log-interval must be a positive integer, got {log_interval!r}")
        if not isinstance(start_iteration, int) or start_iteration < 0:
            raise ConfigError(f"start_iteration must be a non-negative integer, got {start_iteration!r}")
        self.is_writer = is_writer
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.domain_names = list(domain_names) if domain_names is not None else None
        self.list_labels = {k: list(v) for k, v in (list_labels or {}).items()}
        self.list_limit = list_limit
        self.domain_clusters, self.cluster_names = domain_clusters, cluster_names
        self.timestamps = timestamps
        self._stream = stream
        self._file = None
        self._tb = None
        self._wandb = None
        if not is_writer:
            return
        self.path = Path(log_dir) / METRICS_FILENAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_iteration == 0:
                kept = _keep_previous_run(self.path.parent)
                if kept is not None:
                    logger.warning(
                        "%s holds the metrics of an earlier run and this run starts from iteration 0 "
                        "(no --load): moved them to %s; pass --load to continue that run instead",
                        self.path.parent,
                        kept,
                    )
            else:
                dropped = _truncate_after(self.path, start_iteration)
                if dropped:
                    logger.warning(
                        "%s: dropped %d entr%s past the resumed iteration %d (original kept as %s.bak)",
                        self.path,
                        dropped,
                        "y" if dropped == 1 else "ies",
                        start_iteration,
                        self.path.name,
                    )
            self._file = open(self.path, "a", encoding="utf-8")
        except OutputError:
            raise
        except OSError as exc:
            raise output_error(exc, self.path, "--log-dir", explained_only=False) from exc
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=start_iteration + 1)
        if wandb_init is not None:
            self._wandb = _start_wandb(dict(wandb_init))

    # ------------------------------------------------------------------ public API

    def should_log(self, iteration: int) -> bool:
        """True every ``log_interval`` iterations."""
        return iteration % self.log_interval == 0

    def log(self, iteration: int, scalars: Mapping[str, Any], *, console: bool = True) -> Optional[str]:
        """Record one iteration's metrics on all sinks.

        Args:
            iteration: Training iteration (the TensorBoard step and the jsonl ``iteration``).
            scalars: Metric key -> number, list of numbers (one per domain), string,
                tensor or NumPy array. Keys are kept verbatim in metrics.jsonl.
            console: Also print the console line (scalar values only).

        Returns:
            The console line on the writer rank (also when not printed), else None.

        Raises:
            ConfigError: A key named ``iteration``, an unsupported value type, or a list
                whose length does not match its labels.
        """
        if not self.is_writer:
            return None
        if "iteration" in scalars:
            raise ConfigError("metric key 'iteration' is reserved; pass it as the first argument of log()")
        values = {key: self._summarized(key, value) for key, value in scalars.items()}
        # Tags first: a label mismatch must fail before anything is written.
        tags = [pair for key, value in values.items() for pair in self.tags_for(key, value)]
        record = {"iteration": int(iteration), **{k: _encode(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as exc:  # e.g. the disk filled up during the run: one line naming the file
            raise output_error(exc, self.path, "--log-dir", explained_only=False) from exc
        if self._tb is not None:
            for tag, number in tags:
                self._tb.add_scalar(tag, number, global_step=iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(tags), step=int(iteration))
        line = self.format_line(iteration, values)
        if console:
            console_print(line, self._stream)
        return line

    def _labels(self, key: str, n: int) -> Optional[list]:
        """The labels of a list metric of ``n`` values (None: positions); ConfigError on a length mismatch."""
        labels = self.list_labels.get(key, self.domain_names)
        if labels is not None and len(labels) != n:
            raise ConfigError(
                f"metric {key!r} has {n} values but {len(labels)} labels "
                f"({labels[:4]}...); pass list_labels={{{key!r}: [...]}} for lists over other sets"
            )
        return labels

    def _summarized(self, key: str, value: Any) -> Any:
        """``value`` as plain Python, or its :func:`summarize_list` summary when it is a numeric list
        longer than ``list_limit``."""
        if (
            self.list_limit is not None
            and not isinstance(value, (str, bytes, Mapping))
            and hasattr(value, "__len__")
            and len(value) > self.list_limit
        ):
            import numpy as np

            try:
                numbers = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                numbers = None
            if numbers is not None and numbers.ndim == 1:
                labels = self._labels(key, numbers.size)
                over_domains = key not in self.list_labels and self.domain_clusters is not None
                return summarize_list(
                    numbers,
                    labels,
                    key in DISTRIBUTION_KEYS,
                    self.domain_clusters if over_domains else None,
                    self.cluster_names,
                )
        return _plain(value, key)

    def format_line(self, iteration: int, values: Mapping[str, Any]) -> str:
        """Megatron-style console line for ``values`` (lists and strings are left out)."""
        parts = []
        if self.timestamps:
            parts.append(datetime.datetime.now().strftime("[%Y-%m-%d %H:%M:%S]"))
        head = f" iteration {iteration:8d}"
        if self.train_iters is not None:
            head += f"/{self.train_iters:8d}"
        parts.append(head + " |")
        for key, label, fmt in _CONSOLE_FIELDS:
            if key in values and _is_number(values[key]):
                parts.append(f" {label}: {_format(values[key], fmt)} |")
        for key, value in values.items():
            if key not in _CONSOLE_KEYS and _is_number(value):
                fmt = "{:d}" if isinstance(value, int) else "{:.6E}"
                parts.append(f" {key.replace('_', ' ')}: {_format(value, fmt)} |")
        return "".join(parts)

    def tags_for(self, key: str, value: Any) -> list[tuple[str, float]]:
        """TensorBoard ``(tag, value)`` pairs for one metric (empty for strings/None)."""
        base = TENSORBOARD_TAGS.get(key, key if "/" in key else f"train/{key}")
        if _is_number(value):
            return [(base, float(value))]
        if isinstance(value, Mapping) and value.get("summary") is True:
            return [(f"{base}_{stat}", v) for stat, v in _summary_scalars(value, key in DISTRIBUTION_KEYS)]
        if isinstance(value, list) and value and all(_is_number(v) for v in value):
            labels = self._labels(key, len(value)) or [str(i) for i in range(len(value))]
            return [(f"{base}/{label}", float(v)) for label, v in zip(labels, value)]
        return []

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wandb_missing(project: str) -> str:
    """The error for --wandb-project without the W&B client (one message for start-up and logger)."""
    return (
        f"--wandb-project {project} needs the W&B client (the optional 'wandb' package), which is not "
        "installed; pip install 'megatron-dga[wandb]' (or pip install wandb), or drop --wandb-project"
    )


def _start_wandb(init: dict):
    """``wandb.init(**init)``, its failures as one ConfigError naming the fix."""
    project = init.get("project")
    try:
        import wandb
    except ImportError:
        raise ConfigError(wandb_missing(project)) from None
    try:
        return wandb.init(**init)
    except Exception as exc:
        raise ConfigError(
            f"--wandb-project {project}: wandb.init failed ({type(exc).__name__}: {exc}); log in with "
            "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write the run locally "
            "(--wandb-save-dir, default the log directory) and upload it later with `wandb sync`"
        ) from None


def _format(value: float | int, fmt: str) -> str:
    if "d}" in fmt:
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                return f"{value:.6E}"
            value = int(value)
    return fmt.format(value)
