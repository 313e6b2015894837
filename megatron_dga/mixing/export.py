"""A run's mixture, read back from its logs, for training another model on it (DoReMi/RegMix style).

A mixture learned on a small proxy model (``--mixing dga``) is exported and a larger model is
trained on it statically. This module reads a finished (or running) run's ``--log-dir``
(``metrics.jsonl`` + ``run_info.json``) and gives:

* **final** weights: those in effect after the last logged iteration (what a continuation
  would draw with);
* **time-averaged** weights over the iterations ``(start, end]`` (default: the whole run)::

      avg = sum_t n_t * w(t) / sum_t n_t

  over the training steps ``t`` in the window, where ``w(t)`` is the mixture the sampler drew
  step ``t``'s global batch from and ``n_t`` the samples that batch held (the global batch size).
  Trained with ``--mixing static`` for the same number of steps, a run draws, in expectation,
  exactly the source run's samples per domain;
* the **piecewise schedule**: the steps ``(start, end]`` with the mixture of each piece.

What the log says, and how ``w(t)`` is recovered exactly: each ``metrics.jsonl`` line at
iteration ``i`` records ``domain_weights`` (and ``basis_weights`` with ``--dga-basis``) *after*
step ``i``'s mixing update, i.e. the mixture of steps ``i+1, ...``; ``consumed_samples`` counts the
samples drawn so far. DGA changes the weights only after steps that are multiples of
``--dga-interval`` (run_info.json's config), so between two such updates the mixture is the one
logged at any line in between. The weights of the steps before the first log line come from
``run_info.json`` (``--dga-init`` uniform, static or a weights file; ``--dga-basis``: uniform over
the bases) when DGA updated before that line. When a piece of the run lies between two updates
with no log line (``--log-interval`` longer than ``--dga-interval``), its weights are unknown and
the average is refused (a DataError naming both flags) rather than approximated.

Weight spaces: ``domains`` (the K sampling weights ``domain_weights``) or ``basis`` (the N weights
over the basis distributions of ``--dga-basis``, ``basis_weights``; the K-vector is
``gamma^T P``). A K-vector longer than ``--log-domains-limit`` is logged as a summary only: export
the basis weights then.

Output formats (:func:`write_export`):

* ``weights``: the weights-v1 JSON of ``mixing/weights_io.py`` (read by ``--dga-init FILE`` and
  ``--mixing importance --importance-weights FILE``);
* ``data-path``: the value of Megatron's ``--data-path W1 P1 W2 P2 ...`` (prefixes from the run's own
  ``--data-path``), one line, a file for ``--data-args-path FILE`` (``--mixing static`` reads it);
* ``schedule``: :data:`SCHEDULE_FORMAT` JSON, ``{"format", "space", "domains", "segments":
  [{"start_iteration": a, "end_iteration": b, "weights": [...]}, ...]}``: the weights in effect for
  the steps ``a+1 .. b``. No trainer flag consumes it yet: it documents the trajectory.

Exact reproduction: a consumer normalises the weights it is given (``parse_data_path`` divides by
their Python sum, the sampler by their numpy sum), which can move the last bit. The writers export
the vector that the consumer of their format keeps bit for bit (:func:`exact_simplex`, within a
few ulps of the float64 average, which ``meta.raw_weights`` keeps), so ``--mixing static`` samples
by exactly the bits in the file and logs them as its ``domain_weights``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_dga.errors import DataError
from megatron_dga.mixing.config import logged_strategy
from megatron_dga.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

SCHEDULE_FORMAT = "megatron-dga/mixture-schedule-v1"
"""``format`` of a piecewise schedule file (module docstring)."""

HISTORY_FORMAT = "megatron-dga/mixture-history-v1"
"""``format`` of the mixture history written beside an exported model (:func:`mixture_history`)."""

HISTORY_FILENAME = "mixture_history.json"
"""Its name in a Hugging Face export directory."""

STATISTICS = ("time-average", "final")
FORMATS = ("weights", "data-path", "schedule")
SPACES = ("domains", "basis")

_KEYS = {"domains": "domain_weights", "basis": "basis_weights"}


# --------------------------------------------------------------------------- reading a run
@dataclass
class RunLog:
    """What a run's --log-dir holds: its metrics.jsonl entries and run_info.json."""

    log_dir: str
    entries: List[dict]
    """metrics.jsonl, one dict per logged iteration, in iteration order."""
    domains: List[str]
    """The K training domain names (run_info.json)."""
    basis_names: Optional[List[str]]
    """The N basis names with --dga-basis, else None."""
    config: Dict[str, Any] = field(default_factory=dict)
    """run_info.json's resolved config (the run's flags)."""

    @property
    def mixing(self) -> Dict[str, Any]:
        return self.config.get("mixing") or {}

    def names(self, space: str) -> List[str]:
        if space == "basis":
            if not self.basis_names:
                raise DataError(
                    f"{self.log_dir}: the run has no --dga-basis (run_info.json lists no basis_names); "
                    "export --space domains"
                )
            return list(self.basis_names)
        return list(self.domains)


def read_run(log_dir: str | os.PathLike) -> RunLog:
    """The run logged in ``log_dir`` (metrics.jsonl and run_info.json); DataError naming what is missing."""
    from megatron_dga.training.metrics import METRICS_FILENAME, RUN_INFO_FILENAME, read_metrics

    log_dir = os.fspath(log_dir)
    info_path = os.path.join(log_dir, RUN_INFO_FILENAME)
    if not os.path.isfile(os.path.join(log_dir, METRICS_FILENAME)):
        raise DataError(f"{log_dir}: no {METRICS_FILENAME}; give a run's --log-dir (or its --save directory)")
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        raise DataError(
            f"{log_dir}: no {RUN_INFO_FILENAME} beside {METRICS_FILENAME} (it names the domains); "
            "give the --log-dir of a megatron-dga run"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{info_path} is unreadable ({exc}); it is written at the start of every run") from None
    entries = sorted(read_metrics(log_dir), key=lambda m: m.get("iteration", 0))
    if not entries:
        raise DataError(
            f"{os.path.join(log_dir, METRICS_FILENAME)} holds no logged iteration yet; export after the "
            "run's first log line (--log-interval)"
        )
    domains = info.get("domains")
    if not isinstance(domains, list) or not domains:
        raise DataError(f"{info_path}: 'domains' is {domains!r}, expected the list of domain names")
    return RunLog(log_dir, entries, list(domains), info.get("basis_names") or None, info.get("config") or {})


def find_log_dir(path: str | os.PathLike) -> str:
    """The --log-dir of ``path``: itself when it holds metrics.jsonl, else (a checkpoint root, the run's
    --save) the directory whose run_info.json names it as --save: itself (the trainer's default log dir)
    or its parent (the experiment runner's ``<run>/ckpt``)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a directory; give a run's --log-dir or its checkpoint directory (--save)")
    for candidate in (path, os.path.dirname(path)):
        if not os.path.isfile(os.path.join(candidate, "metrics.jsonl")):
            continue
        if candidate == path:
            return candidate
        try:
            with open(os.path.join(candidate, "run_info.json"), encoding="utf-8") as fh:
                save = ((json.load(fh).get("config") or {}).get("checkpoint") or {}).get("save")
        except (OSError, ValueError):
            continue
        if save and os.path.abspath(save) == path:
            return candidate
    raise DataError(
        f"{path}: no metrics.jsonl here or in a parent run directory whose run_info.json names it as "
        "--save; give the run's --log-dir"
    )


# --------------------------------------------------------------------------- the history
@dataclass
class MixtureHistory:
    """The weights a run logged, in one space, with what is needed to know every step's mixture."""

    names: List[str]
    space: str
    iterations: np.ndarray
    """int64 (M,): the logged iterations."""
    weights: np.ndarray
    """float64 (M, n): weights after each logged iteration's step (the mixture of the steps after it)."""
    samples_per_step: np.ndarray
    """float64 (M,): samples per step in the window ending at each line (consumed samples / steps)."""
    update_interval: Optional[int]
    """Steps between mixing updates (--dga-interval), None when the weights never change."""
    initial: Optional[np.ndarray]
    """The weights of step 1 from run_info.json's config, None when it does not say."""
    source: str = ""
    """Where the history comes from (error messages, provenance)."""
    log_interval: Optional[int] = None

    def _updates(self, a: int, b: int) -> List[int]:
        """Iterations u with a < u <= b after whose step the weights may change."""
        t = self.update_interval
        if t is None:
            return []
        return list(range((a // t + 1) * t, b + 1, t))

    def state_at(self, s: int) -> Optional[np.ndarray]:
        """The weights after step ``s`` (``s = 0``: the initial weights), or None when the log cannot tell."""
        its = self.iterations
        j = int(np.searchsorted(its, s, side="right")) - 1  # last logged iteration <= s
        prev_it, prev_w = (int(its[j]), self.weights[j]) if j >= 0 else (0, self.initial)
        if prev_w is not None and not self._updates(prev_it, s):
            return prev_w
        k = int(np.searchsorted(its, s, side="left"))  # first logged iteration >= s
        if k < its.size and not self._updates(s, int(its[k])):
            return self.weights[k]
        return None

    def segments(self, start: int = 0, end: Optional[int] = None) -> List[Tuple[int, int, float, np.ndarray]]:
        """The steps ``(start, end]`` cut where the mixture may change: ``(a, b, samples per step, weights)``
        for steps ``a+1 .. b``. DataError when some piece's weights are not in the log."""
        last = int(self.iterations[-1])
        end = last if end is None else end
        if not 0 <= start < end <= last:
            raise DataError(
                f"--window {start}:{end}: need 0 <= START < END <= {last}, the last logged iteration of {self.source}"
            )
        out = []
        lo = 0
        for it, spw in zip(self.iterations.tolist(), self.samples_per_step.tolist()):
            a, b = max(lo, start), min(it, end)
            lo = it
            if a >= b:
                continue
            cuts = [a, *(u for u in self._updates(a, b - 1)), b]
            for x, y in zip(cuts, cuts[1:]):
                w = self.state_at(x)
                if w is None:
                    raise DataError(self._unknown(x, y))
                out.append((x, y, spw, w))
        return out

    def _unknown(self, a: int, b: int) -> str:
        if a == 0 or self.initial is None and a < int(self.iterations[0]):
            return (
                f"{self.source}: the weights of steps {a + 1}..{b} (before the first mixing update) are not in "
                f"metrics.jsonl and run_info.json does not give them (--dga-init natural); export a window "
                f"starting at the first logged iteration (--window {int(self.iterations[0])}:END)"
            )
        return (
            f"{self.source}: the weights of steps {a + 1}..{b} are not in metrics.jsonl: DGA updated them "
            f"after step {a} (--dga-interval {self.update_interval}) and no line was logged before the next "
            f"update (--log-interval {self.log_interval}); the average would be approximate. Train with "
            "--log-interval <= --dga-interval, or export --statistic final"
        )

    def time_average(self, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Mean weights over the steps ``(start, end]``, each step weighted by its samples (module docstring)."""
        total = np.zeros(len(self.names), dtype=np.float64)
        count = 0.0
        for a, b, spw, w in self.segments(start, end):
            n = (b - a) * spw
            total += n * w
            count += n
        if not count > 0:
            raise DataError(f"{self.source}: no samples drawn in steps {start + 1}..{end}; nothing to average")
        return total / count

    def final(self) -> np.ndarray:
        """The weights after the last logged step."""
        return self.weights[-1].copy()


def history(run: RunLog, space: str = "domains") -> MixtureHistory:
    """The run's mixture history in ``space`` ("domains": the K sampling weights; "basis": the N basis weights)."""
    if space not in SPACES:
        raise DataError(f"--space {space!r}: one of {', '.join(SPACES)}")
    names = run.names(space)
    key = _KEYS[space]
    metrics_path = os.path.join(run.log_dir, "metrics.jsonl")
    rows, iters, consumed = [], [], []
    for m in run.entries:
        value = m.get(key)
        where = f"{metrics_path}, iteration {m.get('iteration')}"
        if isinstance(value, dict):
            raise DataError(
                f"{where}: {key} is logged as a summary ({len(names)} entries > --log-domains-limit), "
                "not the full vector"
                + (
                    "; export --space basis (the N basis weights) instead"
                    if space == "domains" and run.basis_names
                    else "; rerun with --log-domains-limit >= the number of domains"
                )
            )
        if not isinstance(value, list) or len(value) != len(names):
            raise DataError(
                f"{where}: {key} is {str(value)[:60]!r}, expected {len(names)} numbers (one per name in run_info.json)"
            )
        if not isinstance(m.get("consumed_samples"), int):
            raise DataError(f"{where}: no consumed_samples; the file was not written by the megatron-dga trainer")
        rows.append(value)
        iters.append(int(m["iteration"]))
        consumed.append(int(m["consumed_samples"]))
    iterations = np.asarray(iters, dtype=np.int64)
    if np.any(np.diff(iterations) <= 0) or iterations[0] <= 0:
        raise DataError(
            f"{metrics_path}: logged iterations {iters[:6]}... are not increasing from 1; give the log of one run"
        )
    steps = np.diff(np.concatenate([[0], iterations])).astype(np.float64)
    samples = np.diff(np.concatenate([[0], np.asarray(consumed, dtype=np.int64)])).astype(np.float64)
    mixing = run.mixing
    dga = logged_strategy(mixing) == "dga"
    return MixtureHistory(
        names=names,
        space=space,
        iterations=iterations,
        weights=np.asarray(rows, dtype=np.float64),
        samples_per_step=samples / steps,
        update_interval=int(mixing.get("dga_interval") or 10) if dga else None,
        initial=_initial_weights(run, space) if dga else None,
        source=run.log_dir,
        log_interval=(run.config.get("schedule") or {}).get("log_interval"),
    )


def _initial_weights(run: RunLog, space: str) -> Optional[np.ndarray]:
    """DGA's weights before its first update, from the run's config; None when the config cannot tell."""
    mixing = run.mixing
    if mixing.get("dga_basis"):  # DGA over the bases starts uniform over them
        if space == "domains":
            return None  # gamma^T P: needs the basis file, and the first log line usually tells
        n = len(run.basis_names or [])
        return np.full(n, 1.0 / n) if n else None
    init = mixing.get("dga_init") or "uniform"
    k = len(run.domains)
    if init == "uniform":
        return np.full(k, 1.0 / k)
    if init == "static":
        from megatron_dga.data.domains import parse_data_path

        data_path = (run.config.get("data") or {}).get("data_path")
        try:
            names, _, weights = parse_data_path(data_path or "")
        except DataError:
            return None
        if weights is None or sorted(names) != sorted(run.domains):
            return None
        by_name = dict(zip(names, weights))
        return np.asarray([by_name[n] for n in run.domains], dtype=np.float64)
    if init == "natural":
        return None
    from megatron_dga.mixing.weights_io import load_weights

    path = mixing.get("importance_weights") if init == "importance" else init
    try:
        return load_weights(path, expected_domains=run.domains) if path else None
    except DataError:
        return None


# --------------------------------------------------------------------------- exact vectors
def _sampler_normalise(w: np.ndarray) -> np.ndarray:
    """What the sampler does to weights it is given (DynamicMixtureSampler.set_weights): divide by the numpy sum."""
    return w / w.sum()


def _data_path_normalise(w: np.ndarray) -> np.ndarray:
    """What --data-path W1 P1 ... does to the weights written with repr (parse_data_path), then the sampler."""
    from megatron_dga.data.domains import parse_data_path

    tokens = [tok for i, x in enumerate(w.tolist()) for tok in (repr(float(x)), f"d{i}")]
    return _sampler_normalise(np.asarray(parse_data_path(tokens)[2], dtype=np.float64))


def exact_simplex(weights: np.ndarray, fmt: str = "weights") -> np.ndarray:
    """``weights`` normalised to a vector its consumer keeps bit for bit: a fixed point of the sampler's
    division by the sum (``weights``: a weights file read by --dga-init / --mixing importance), or of
    parse_data_path's division by the Python sum followed by the sampler's (``data-path``).

    Found by applying the consumer's normalisation until nothing changes, else by moving one of the
    largest entries by the fewest ulps that make it a fixed point (the normalisation can alternate
    between two neighbours). When neither finds one (about 1 vector in 1,000 over 33 domains in
    the data-path format, measured) a warning says so and the consumer moves an entry by an ulp.
    """
    consume = _data_path_normalise if fmt == "data-path" else _sampler_normalise
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    for _ in range(8):  # usually settles at once
        v = consume(w)
        if np.array_equal(v, w):
            return w
        w = v
    # Else (the normalisation flips between two neighbours): move one entry by the fewest ulps that make
    # the consumer keep the vector. Sums add the last entries last, so those move the total in the
    # finest steps; then the largest entries (an ulp of 1.0 is many ulps of a small entry).
    order = np.argsort(-w, kind="stable")[:4].tolist()
    for idx in dict.fromkeys([w.size - 1, w.size - 2, *order]):
        if idx < 0 or w[idx] == 0:
            continue
        reach = min(256, 4 * int(np.ceil(np.spacing(1.0) / np.spacing(w[idx]))) + 16)
        for d in sorted(range(-reach, reach + 1), key=abs):
            c = w.copy()
            c[idx] = w[idx] + d * np.spacing(w[idx])
            if np.array_equal(consume(c), c):
                return c
    logger.warning(
        "the exported weights are not kept bit for bit by their consumer (%s): it will renormalise "
        "them by an ulp or so (|change| <= %.1e)",
        fmt,
        float(np.abs(consume(w) - w).max()),
    )
    return w


# --------------------------------------------------------------------------- writing
@dataclass
class Export:
    """One exported mixture: names, the vector (or the pieces of a schedule) and where it came from."""

    names: List[str]
    space: str
    weights: Optional[np.ndarray]
    """The exported vector as computed (float64), None for a schedule; the writers pass it through
    :func:`exact_simplex` for their format."""
    segments: Optional[List[Tuple[int, int, float, np.ndarray]]] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def export_mixture(
    path: str | os.PathLike,
    *,
    statistic: str = "time-average",
    space: str = "domains",
    window: Optional[Tuple[int, Optional[int]]] = None,
    schedule: bool = False,
) -> Export:
    """The mixture of the run at ``path`` (a --log-dir, or its checkpoint root): time-averaged over
    ``window`` (iterations ``(start, end]``, default the whole run), final, or the piecewise schedule."""
    if statistic not in STATISTICS:
        raise DataError(f"--statistic {statistic!r}: one of {', '.join(STATISTICS)}")
    run = read_run(find_log_dir(path))
    hist = history(run, space)
    start, end = window or (0, None)
    meta = {
        "source": os.path.abspath(run.log_dir),
        "method": logged_strategy(run.mixing),
        "space": space,
        "logged_iterations": [int(hist.iterations[0]), int(hist.iterations[-1])],
    }
    if schedule:
        segs = hist.segments(start, end)
        meta.update(statistic="schedule", window=[segs[0][0], segs[-1][1]])
        return Export(hist.names, space, None, segs, meta)
    if statistic == "final":
        if window is not None:
            raise DataError(
                "--window goes with --statistic time-average (or --format schedule); final weights are "
                "those after the last logged step"
            )
        raw = hist.final()
        meta.update(statistic="final", iteration=int(hist.iterations[-1]))
    else:
        raw = hist.time_average(start, end)
        end = int(hist.iterations[-1]) if end is None else end
        meta.update(
            statistic="time-average",
            window=[start, end],
            definition="sum_t n_t w(t) / sum_t n_t over the steps t in (window[0], window[1]]: w(t) the "
            "mixture step t drew from, n_t its samples",
        )
    meta["raw_weights"] = [float(x) for x in raw]
    return Export(hist.names, space, raw, None, meta)


def data_path_tokens(names: Sequence[str], weights: np.ndarray, data_path: Sequence[str] | str) -> List[str]:
    """``W1 P1 W2 P2 ...`` for Megatron's --data-path: each name's prefix from the run's own --data-path,
    each weight written with ``repr`` (it reads back to the same float)."""
    from megatron_dga.data.domains import parse_data_path

    run_names, prefixes, _ = parse_data_path(data_path)
    prefix = dict(zip(run_names, prefixes))
    missing = [n for n in names if n not in prefix]
    if missing:
        raise DataError(
            f"--format data-path: {missing[:5]} are not prefixes of the run's --data-path (with "
            "--domain-map the weights are over fine domains): use --format weights and train with "
            "--mixing importance --importance-weights FILE"
        )
    return [tok for n, w in zip(names, weights.tolist()) for tok in (repr(float(w)), prefix[n])]


def write_export(
    exp: Export, output: str | os.PathLike, fmt: str = "weights", data_path: Sequence[str] | str | None = None
) -> None:
    """Write ``exp`` to ``output`` as ``fmt`` (module docstring); ``data_path``: the run's --data-path."""
    from megatron_dga.mixing.weights_io import save_weights

    output = os.fspath(output)
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if (fmt == "schedule") != (exp.segments is not None):
        raise DataError(
            "--format schedule writes the piecewise mixture; the weights and data-path formats write one vector"
        )
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise DataError(f"--output {output}: directory {directory} does not exist; create it first")
    if fmt == "weights":
        save_weights(output, exp.names, exact_simplex(exp.weights, fmt), meta=exp.meta)
    elif fmt == "data-path":
        if data_path is None:
            raise DataError("--format data-path needs the run's --data-path (run_info.json has none)")
        tokens = data_path_tokens(exp.names, exact_simplex(exp.weights, fmt), data_path)
        atomic_write_text(output, " ".join(tokens) + "\n")
    else:
        atomic_write_json(
            output,
            {
                "format": SCHEDULE_FORMAT,
                "space": exp.space,
                "domains": exp.names,
                "segments": [
                    {"start_iteration": a, "end_iteration": b, "weights": [float(x) for x in w]}
                    for a, b, _, w in exp.segments
                ],
                "meta": exp.meta,
            },
            indent=1,
        )


# --------------------------------------------------------------------------- history beside a model
def mixture_history(log_dir: str | os.PathLike, up_to: Optional[int] = None) -> dict:
    """The run's mixture over time and the tokens it drew per domain, as written beside an exported
    model (:data:`HISTORY_FILENAME`)::

        {"format": HISTORY_FORMAT, "domains": [K names], "basis_names": [N] | null,
         "iterations": [...], "consumed_tokens": [...],
         "domain_weights": [[K] per line] (or the logged summaries), "basis_weights": [[N] ...] | null,
         "tokens_per_domain": [K] (summed domain_samples x --seq-length) | null,
         "time_averaged_weights": [K] | null}

    ``up_to``: keep the lines up to that iteration (a checkpoint's: the history of the exported weights).
    """
    run = read_run(log_dir)
    if up_to is not None:
        run.entries = [m for m in run.entries if int(m.get("iteration", 0)) <= up_to]
        if not run.entries:
            raise DataError(f"{log_dir}: no line logged up to iteration {up_to}")
    seq = (run.config.get("model") or {}).get("seq_length")
    samples = [m.get("domain_samples") for m in run.entries]
    tokens = None
    if seq and all(isinstance(s, list) and len(s) == len(run.domains) for s in samples):
        tokens = (np.sum(np.asarray(samples, dtype=np.int64), axis=0) * int(seq)).tolist()
    try:
        averaged = [float(x) for x in history(run, "domains").time_average()]
    except DataError:
        averaged = None
    return {
        "format": HISTORY_FORMAT,
        "source": os.path.abspath(run.log_dir),
        "method": logged_strategy(run.mixing),
        "domains": run.domains,
        "basis_names": run.basis_names,
        "iterations": [int(m["iteration"]) for m in run.entries],
        "consumed_tokens": [m.get("consumed_tokens") for m in run.entries],
        "domain_weights": [m.get("domain_weights") for m in run.entries],
        "basis_weights": [m.get("basis_weights") for m in run.entries] if run.basis_names else None,
        "tokens_per_domain": tokens,
        "time_averaged_weights": averaged,
        "note": "domain_weights at an iteration: the mixture after that step's update (of the steps after it)",
    }
