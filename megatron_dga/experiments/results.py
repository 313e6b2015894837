"""Comparing methods over seeds: per-run numbers, per-method spreads, paired differences, verdicts.

Everything is recomputed from the runs' metrics.jsonl and run_info.json (``experiment.RunResult``),
never from a file of numbers. For each run (a method under one seed):

* final target loss: the last ``specific_eval_loss``; best: its minimum, and the iteration of
  the first minimum;
* generic loss: the mean over domains of ``domain_eval_loss`` at the last evaluation;
* training time: sum over log windows of ``ms_per_iter`` x iterations in the window (the
  trainer's step clock: training steps and DGA updates, not evaluation, checkpoints or start-up);
* cost model of DGA's extra work per training step (:mod:`megatron_dga.mixing.cost_model`):
  exact ``(k b_dom + b_spe) / (T_r B)``, finite differences ``(b_spe + 2/3 k b_dom) / (T_r B)``,
  with k the domains, or the basis distributions with --dga-basis.

Paired differences compare a method with a baseline (uniform, importance) seed by seed:
``d_s = final(method, s) - final(baseline, s)``, over the n seeds both ran. Negative is better.
The verdict is a paired t interval on those differences (the pairing removes what a seed does to
both runs alike, such as the initial weights):

    mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)     (sd with n-1 in the denominator)
    beats         the whole 95 % interval below 0
    worse         the whole interval above 0
    within noise  otherwise ("one seed: no verdict" with fewer than 2 paired seeds)

beside the sign count (how many d_s < 0). With 3 seeds t = 4.30, with 2 seeds t = 12.71: two seeds
separate only a gap much larger than its seed-to-seed variation.

Downstream accuracies (``--eval-tasks``: each run's downstream.json, lm_eval's ``acc`` and
``acc_norm`` per task) get the same statistics: mean/min/max over seeds per method, and paired
differences ``d_s = acc(method, s) - acc(baseline, s)`` with the same paired t interval, where higher
is better: beats when the whole interval is above 0, worse when it is below (:class:`Pair` with
``higher_is_better``).

The earlier rule is kept beside it (:attr:`Pair.spread_verdict`, the ``noise`` and ``verdict``
columns of results.csv). It compares the mean difference with the baseline's own spread over seeds,
``noise = max_s final(baseline, s) - min_s final(baseline, s)``: beats when every d_s < 0 and
mean(d) < -noise, worse symmetrically. It ignores the pairing, so a method better on every seed by
less than the baseline's spread stays "within noise" under it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_dga.fileio import atomic_write_json

PLOTS_FILE = "plots.json"
"""Beside the plots: the runs they were drawn from (a re-run with no new run keeps them)."""

BASELINES = ("uniform", "importance")
"""The methods every other one is paired with, when they ran."""

NOISE_FOOTNOTE = (
    "Paired difference d_s = final target eval loss of the method minus that of the baseline under the same "
    "seed s (negative: the method is better), over the n seeds both ran; mean, min, max and per seed. Verdict "
    "(paired t): the 95% interval of mean(d) is mean(d) +- t(0.975, n-1) sd(d) / sqrt(n); beats = the whole "
    "interval below 0, worse = the whole interval above 0, otherwise within noise; fewer than 2 seeds: no "
    "verdict (t = 4.30 with 3 seeds, 12.71 with 2). Seeds lower: how many d_s < 0. Kept beside it, the earlier "
    "spread rule, which ignores the pairing: baseline spread = max - min of the baseline's own final target "
    "eval loss over the seeds; beats = every d_s < 0 and mean(d) < -spread; worse = every d_s > 0 and "
    "mean(d) > spread; otherwise within noise."
)

ACCURACY_METRICS = ("acc", "acc_norm")
"""lm_eval metrics reported as downstream accuracies (higher is better)."""

ACCURACY_FOOTNOTE = (
    "Downstream accuracy (lm-evaluation-harness on each run's final checkpoint): mean [min, max] over seeds. "
    "Paired difference d_s = accuracy of the method minus that of the baseline under the same seed s (positive: "
    "the method is better); verdict (paired t): beats = the whole 95% interval above 0, worse = the whole "
    "interval below 0, otherwise within noise; seeds higher: how many d_s > 0."
)

T_975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.13145,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.04523,
    2.042272,
)
"""Student's t 0.975 quantiles for 1..30 degrees of freedom (``scipy.stats.t.ppf(0.975, df)``, 6 decimals)."""

Z_975 = 1.959963984540054
"""The standard normal's 0.975 quantile: t's limit as the degrees of freedom grow."""


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (a two-sided 95 % interval) for ``df`` >= 1 degrees of freedom: the
    table :data:`T_975` up to 30, beyond it the Cornish-Fisher expansion around :data:`Z_975` (error
    below 1e-7 from df 31 on). A table, not scipy: the runner needs no optional dependency."""
    if df < 1:
        raise ValueError(f"t quantile: df={df}, needs at least 1 degree of freedom (2 paired seeds)")
    if df <= len(T_975):
        return T_975[df - 1]
    z, v = Z_975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


@dataclass
class RunStats:
    """The numbers of one run."""

    method: str
    seed: int
    final: float
    """Last specific (target) eval loss."""
    best: float
    """Lowest specific eval loss."""
    best_iter: int
    """Iteration of the first evaluation reaching ``best``."""
    generic: float
    """Mean over domains of the domain eval losses at the last evaluation."""
    train_seconds: float
    """Time in training steps and mixing updates (module docstring)."""
    wall_seconds: float
    """Wall-clock seconds of all attempts of the run."""
    cost_model: Optional[float]
    """DGA's extra forward+backward work per step over the training step's (None: no DGA)."""
    final_epochs: List[float] = field(default_factory=list)
    """Epochs consumed per domain at the end (``domain_epochs``)."""
    downstream: Dict[str, float] = field(default_factory=dict)
    """Downstream accuracies of the final checkpoint, {"<task>:<metric>": value} (:data:`ACCURACY_METRICS`)."""


def accuracies(downstream: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """{"<task>:<metric>": value} of lm_eval's per-task metrics, the :data:`ACCURACY_METRICS` only."""
    return {
        f"{task}:{metric}": float(values[metric])
        for task, values in sorted(downstream.items())
        for metric in ACCURACY_METRICS
        if metric in values
    }


def _train_seconds(metrics: Sequence[dict]) -> float:
    total, previous = 0.0, 0
    for m in metrics:
        it, ms = int(m["iteration"]), m.get("ms_per_iter")
        if ms is not None and math.isfinite(ms) and it > previous:
            total += ms * (it - previous) / 1000.0
        previous = it
    return total


def cost_model(info: dict) -> Optional[float]:
    """DGA's cost-model overhead (:func:`megatron_dga.mixing.cost_model.dga_overhead`) of a run, from
    its run_info.json config; None without DGA. The sources are the basis distributions with
    --dga-basis, else the domains."""
    from megatron_dga.mixing.config import logged_strategy
    from megatron_dga.mixing.cost_model import dga_overhead

    config = info.get("config", {})
    mixing = config.get("mixing", {})
    if logged_strategy(mixing) != "dga":
        return None
    sources = len(info.get("basis_names") or info.get("domains") or [])
    return dga_overhead(
        sources,
        mixing["dga_domain_batch_size"],
        mixing["dga_specific_batch_size"],
        mixing["dga_interval"],
        config["schedule"]["global_batch_size"],
        mixing.get("dga_estimator") or "exact",
    )


def run_stats(result) -> RunStats:
    """RunStats of an ``experiment.RunResult``."""
    evals = [
        (int(m["iteration"]), m["specific_eval_loss"])
        for m in result.metrics
        if m.get("specific_eval_loss") is not None
    ]
    if not evals:
        raise ValueError(f"{result.run_dir}: no specific_eval_loss in metrics.jsonl (was --eval-iters 0?)")
    best_iter, best = min(evals, key=lambda e: (e[1], e[0]))
    last_eval = next(m for m in reversed(result.metrics) if m.get("specific_eval_loss") is not None)
    generic = last_eval.get("domain_eval_loss") or []
    if isinstance(generic, dict):  # thousands of domains: the trainer logs a summary (its mean)
        generic_mean = generic.get("mean", math.nan)
    else:
        generic_mean = sum(generic) / len(generic) if generic else math.nan
    epochs = next(
        (m["domain_epochs"] for m in reversed(result.metrics) if isinstance(m.get("domain_epochs"), list)), []
    )
    return RunStats(
        result.method,
        result.seed,
        evals[-1][1],
        best,
        best_iter,
        generic_mean,
        _train_seconds(result.metrics),
        result.seconds,
        cost_model(result.info),
        list(epochs),
        accuracies(getattr(result, "downstream", None) or {}),
    )


@dataclass
class Spread:
    """mean, min, max of values over seeds."""

    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = list(values)
        if not values:
            return cls(math.nan, math.nan, math.nan)
        return cls(sum(values) / len(values), min(values), max(values))

    def text(self, fmt: str = "{:.4f}") -> str:
        if math.isnan(self.mean):
            return "-"
        if self.min == self.max:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} [{fmt.format(self.min)}, {fmt.format(self.max)}]"


@dataclass
class Pair:
    """A method against a baseline, seed by seed (module docstring)."""

    method: str
    baseline: str
    diffs: Dict[int, float]
    """Seed -> final(method) - final(baseline)."""
    noise: float
    """The baseline's spread of final target loss over the paired seeds (the earlier rule's noise)."""
    metric: str = "final"
    """What is compared: ``final`` (target eval loss), or a downstream accuracy ``<task>:<metric>``."""
    higher_is_better: bool = False
    """True for accuracies: beats = the interval above 0."""

    @property
    def spread(self) -> Spread:
        return Spread.of(self.diffs.values())

    @property
    def lower(self) -> int:
        """How many seeds have d_s < 0 (the method lower than the baseline)."""
        return sum(1 for x in self.diffs.values() if x < 0)

    @property
    def better(self) -> int:
        """How many seeds have d_s on the better side of 0 (below for losses, above for accuracies)."""
        return sum(1 for x in self.diffs.values() if (x > 0 if self.higher_is_better else x < 0))

    @property
    def interval(self) -> Optional[Tuple[float, float]]:
        """The paired t 95 % interval of mean(d); None with fewer than 2 seeds or a non-finite d."""
        d = list(self.diffs.values())
        if len(d) < 2 or not all(math.isfinite(x) for x in d):
            return None
        n = len(d)
        mean = math.fsum(d) / n
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        return mean - half, mean + half

    @property
    def verdict(self) -> str:
        """The paired t rule (module docstring): beats / worse / within noise."""
        if len(self.diffs) < 2:
            return "one seed: no verdict"
        ci = self.interval
        if ci is None:
            return "non-finite loss: no verdict"
        if ci[1] < 0:
            return "worse" if self.higher_is_better else "beats"
        if ci[0] > 0:
            return "beats" if self.higher_is_better else "worse"
        return "within noise"

    @property
    def spread_verdict(self) -> str:
        """The earlier rule, against the baseline's own spread over seeds (module docstring)."""
        d = list(self.diffs.values())
        if len(d) < 2:
            return "one seed: no verdict"
        mean = sum(d) / len(d)
        if all(x < 0 for x in d) and mean < -self.noise:
            return "worse" if self.higher_is_better else "beats"
        if all(x > 0 for x in d) and mean > self.noise:
            return "beats" if self.higher_is_better else "worse"
        return "within noise"


@dataclass
class Summary:
    """All runs of one scenario, grouped by method."""

    runs: Dict[str, List[RunStats]]
    """Method -> its runs, by seed."""
    pairs: List[Pair]
    accuracy_pairs: List[Pair] = field(default_factory=list)
    """Paired differences of every downstream accuracy (:attr:`accuracy_keys`), higher is better."""

    @property
    def accuracy_keys(self) -> List[str]:
        """The "<task>:<metric>" accuracies any run has, sorted."""
        return sorted({k for stats in self.runs.values() for s in stats for k in s.downstream})

    @classmethod
    def of(cls, results: Sequence, methods: Sequence[str]) -> "Summary":
        runs: Dict[str, List[RunStats]] = {m: [] for m in methods}
        for r in results:
            runs.setdefault(r.method, []).append(run_stats(r))
        for stats in runs.values():
            stats.sort(key=lambda s: s.seed)
        pairs = []
        for base in BASELINES:
            if not runs.get(base):
                continue
            by_seed = {s.seed: s.final for s in runs[base]}
            for method, stats in runs.items():
                if method == base or (base == "importance" and method == "uniform"):
                    continue
                diffs = {s.seed: s.final - by_seed[s.seed] for s in stats if s.seed in by_seed}
                if diffs:
                    baseline = [by_seed[seed] for seed in diffs]
                    pairs.append(Pair(method, base, diffs, max(baseline) - min(baseline)))
        summary = cls(runs, pairs)
        summary.accuracy_pairs = summary._accuracy_pairs()
        return summary

    def _accuracy_pairs(self) -> List[Pair]:
        pairs = []
        for key in self.accuracy_keys:
            for base in BASELINES:
                by_seed = {s.seed: s.downstream[key] for s in self.runs.get(base, []) if key in s.downstream}
                if not by_seed:
                    continue
                for method, stats in self.runs.items():
                    if method == base or (base == "importance" and method == "uniform"):
                        continue
                    diffs = {
                        s.seed: s.downstream[key] - by_seed[s.seed]
                        for s in stats
                        if s.seed in by_seed and key in s.downstream
                    }
                    if diffs:
                        baseline = [by_seed[seed] for seed in diffs]
                        pairs.append(Pair(method, base, diffs, max(baseline) - min(baseline), key, True))
        return pairs

    def accuracy(self, method: str, key: str) -> Spread:
        """mean/min/max over seeds of accuracy ``key`` of ``method``'s runs (NaN without any)."""
        return Spread.of(s.downstream[key] for s in self.runs.get(method, []) if key in s.downstream)

    def accuracy_pair(self, method: str, baseline: str, key: str) -> Optional[Pair]:
        return next(
            (p for p in self.accuracy_pairs if p.method == method and p.baseline == baseline and p.metric == key), None
        )

    def overhead(self, method: str) -> Optional[Spread]:
        """Training-time overhead of ``method`` over the same seed's uniform run (importance
        without uniform): time(method, s) / time(reference, s) - 1; None for non-DGA methods."""
        if all(s.cost_model is None for s in self.runs[method]):
            return None
        ref = next((b for b in BASELINES if self.runs.get(b)), None)
        if ref is None:
            return None
        times = {s.seed: s.train_seconds for s in self.runs[ref]}
        ratios = [
            s.train_seconds / times[s.seed] - 1.0
            for s in self.runs[method]
            if times.get(s.seed, 0) > 0 and s.train_seconds > 0
        ]
        return Spread.of(ratios) if ratios else None

    def pair(self, method: str, baseline: str) -> Optional[Pair]:
        return next((p for p in self.pairs if p.method == method and p.baseline == baseline), None)


def _pct(spread: Optional[Spread]) -> str:
    if spread is None or math.isnan(spread.mean):
        return "-"
    return spread.text("{:+.0%}")


def markdown(summary: Summary, title: str = "") -> str:
    """The results table, the paired-difference table and its footnote (markdown)."""
    lines = [title, ""] if title else []
    lines += [
        "| method | seeds | final target eval loss | best target eval loss | best at iteration "
        "| mean generic eval loss | DGA overhead: wall | DGA overhead: cost model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, stats in summary.runs.items():
        if not stats:
            continue
        cost = Spread.of([s.cost_model for s in stats if s.cost_model is not None])
        lines.append(
            f"| {method} | {len(stats)} | {Spread.of(s.final for s in stats).text()} "
            f"| {Spread.of(s.best for s in stats).text()} | {', '.join(str(s.best_iter) for s in stats)} "
            f"| {Spread.of(s.generic for s in stats).text()} | {_pct(summary.overhead(method))} "
            f"| {'-' if math.isnan(cost.mean) else f'{cost.mean:.0%}'} |"
        )
    lines += [
        "",
        "Values: mean [min, max] over seeds. Wall overhead: training-step time (DGA updates included; "
        "evaluation, checkpoints and start-up excluded) over the same seed's uniform run (importance "
        "sampling's without uniform), minus 1. Cost model: DGA's extra forward+backward samples per "
        "training sample.",
        "",
    ]
    if summary.pairs:
        lines += [
            "| method | vs | mean difference | 95% interval (paired t) | seeds lower | verdict (paired t) "
            "| min | max | per seed | baseline spread | verdict (spread rule) |",
            "|---|---|---:|---|---:|---|---:|---:|---|---:|---|",
        ]
        for p in summary.pairs:
            s = p.spread
            per_seed = ", ".join(f"{seed}: {d:+.4f}" for seed, d in sorted(p.diffs.items()))
            ci = p.interval
            ci_text = "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
            lines.append(
                f"| {p.method} | {p.baseline} | {s.mean:+.4f} | {ci_text} | {p.lower}/{len(p.diffs)} "
                f"| **{p.verdict}** | {s.min:+.4f} | {s.max:+.4f} | {per_seed} | {p.noise:.4f} "
                f"| {p.spread_verdict} |"
            )
        lines += ["", NOISE_FOOTNOTE]
    lines += _accuracy_markdown(summary)
    return "\n".join(lines)


def _accuracy_markdown(summary: Summary) -> List[str]:
    keys = summary.accuracy_keys
    if not keys:
        return []
    lines = [
        "",
        "Downstream accuracy",
        "",
        "| method | seeds | " + " | ".join(keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for method, stats in summary.runs.items():
        if stats:
            lines.append(
                f"| {method} | {len(stats)} | " + " | ".join(summary.accuracy(method, k).text() for k in keys) + " |"
            )
    if summary.accuracy_pairs:
        lines += [
            "",
            "| method | vs | accuracy | mean difference | 95% interval (paired t) | seeds higher "
            "| verdict (paired t) | min | max | per seed |",
            "|---|---|---|---:|---|---:|---|---:|---:|---|",
        ]
        for p in summary.accuracy_pairs:
            s, ci = p.spread, p.interval
            per_seed = ", ".join(f"{seed}: {d:+.4f}" for seed, d in sorted(p.diffs.items()))
            ci_text = "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
            lines.append(
                f"| {p.method} | {p.baseline} | {p.metric} | {s.mean:+.4f} | {ci_text} "
                f"| {p.better}/{len(p.diffs)} | **{p.verdict}** | {s.min:+.4f} | {s.max:+.4f} | {per_seed} |"
            )
    return lines + ["", ACCURACY_FOOTNOTE]


CSV_COLUMNS = (
    "method",
    "seeds",
    "final_mean",
    "final_min",
    "final_max",
    "best_mean",
    "best_min",
    "best_max",
    "best_iters",
    "generic_mean",
    "train_seconds_mean",
    "wall_seconds_mean",
    "overhead_wall_mean",
    "overhead_wall_min",
    "overhead_wall_max",
    "overhead_cost_model",
    *(f"vs_{b}_{c}" for b in BASELINES for c in ("mean", "min", "max", "noise", "verdict")),
    *(f"vs_{b}_{c}" for b in BASELINES for c in ("seeds", "lower", "ci_low", "ci_high", "paired_verdict")),
)
"""results.csv's columns. Per baseline b: ``vs_b_mean/min/max`` of the paired differences, ``vs_b_noise``
and ``vs_b_verdict`` the earlier spread rule's (kept as they were); appended after them, ``vs_b_seeds``
(paired seeds), ``vs_b_lower`` (seeds with d < 0), ``vs_b_ci_low/high`` (the paired t 95 % interval of the
mean difference) and ``vs_b_paired_verdict`` (the verdict by that interval, as in results.md)."""


def csv_text(summary: Summary) -> str:
    """One row per method (columns: :data:`CSV_COLUMNS`; empty where not applicable)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + tuple(accuracy_columns(summary)))
    for method, stats in summary.runs.items():
        if not stats:
            continue
        final, best = Spread.of(s.final for s in stats), Spread.of(s.best for s in stats)
        over = summary.overhead(method)
        costs = [s.cost_model for s in stats if s.cost_model is not None]
        row = [
            method,
            " ".join(str(s.seed) for s in stats),
            final.mean,
            final.min,
            final.max,
            best.mean,
            best.min,
            best.max,
            " ".join(str(s.best_iter) for s in stats),
            Spread.of(s.generic for s in stats).mean,
            Spread.of(s.train_seconds for s in stats).mean,
            Spread.of(s.wall_seconds for s in stats).mean,
            *((over.mean, over.min, over.max) if over else ("", "", "")),
            (sum(costs) / len(costs)) if costs else "",
        ]
        pairs = [summary.pair(method, base) for base in BASELINES]
        for p in pairs:
            row += [p.spread.mean, p.spread.min, p.spread.max, p.noise, p.spread_verdict] if p else [""] * 5
        for p in pairs:
            ci = p.interval if p else None
            row += [len(p.diffs), p.lower, *(ci if ci else ("", "")), p.verdict] if p else [""] * 5
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row + _accuracy_cells(summary, method)])
    return buf.getvalue()


def accuracy_columns(summary: Summary) -> List[str]:
    """results.csv's columns after :data:`CSV_COLUMNS` when the runs have downstream accuracies: per
    accuracy k ("<task>:<metric>"), ``k_mean/_min/_max`` over seeds, then per baseline b
    ``vs_b_k_mean/_min/_max/_seeds/_higher/_ci_low/_ci_high/_paired_verdict`` (as the loss columns)."""
    cols = []
    for k in summary.accuracy_keys:
        cols += [f"{k}_{c}" for c in ("mean", "min", "max")]
        cols += [
            f"vs_{b}_{k}_{c}"
            for b in BASELINES
            for c in ("mean", "min", "max", "seeds", "higher", "ci_low", "ci_high", "paired_verdict")
        ]
    return cols


def _accuracy_cells(summary: Summary, method: str) -> list:
    cells = []
    for k in summary.accuracy_keys:
        acc = summary.accuracy(method, k)
        cells += ["", "", ""] if math.isnan(acc.mean) else [acc.mean, acc.min, acc.max]
        for b in BASELINES:
            p = summary.accuracy_pair(method, b, k)
            ci = p.interval if p else None
            cells += (
                [
                    p.spread.mean,
                    p.spread.min,
                    p.spread.max,
                    len(p.diffs),
                    p.better,
                    *(ci if ci else ("", "")),
                    p.verdict,
                ]
                if p
                else [""] * 8
            )
    return cells


RUNS_CSV_COLUMNS = (
    "method",
    "seed",
    "final",
    "best",
    "best_iter",
    "generic",
    "train_seconds",
    "wall_seconds",
    "cost_model",
    "run_dir",
)


def runs_csv_text(summary: Summary, run_dirs: Dict[Tuple[str, int], str]) -> str:
    """One row per run (columns: :data:`RUNS_CSV_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = summary.accuracy_keys
    writer.writerow(RUNS_CSV_COLUMNS + tuple(keys))
    for method, stats in summary.runs.items():
        for s in stats:
            writer.writerow(
                [
                    method,
                    s.seed,
                    repr(s.final),
                    repr(s.best),
                    s.best_iter,
                    repr(s.generic),
                    f"{s.train_seconds:.3f}",
                    f"{s.wall_seconds:.1f}",
                    "" if s.cost_model is None else f"{s.cost_model:.6g}",
                    run_dirs.get((method, s.seed), ""),
                    *(repr(s.downstream[k]) if k in s.downstream else "" for k in keys),
                ]
            )
    return buf.getvalue()


# --------------------------------------------------------------------------- plots
def _as_list(value) -> Optional[list]:
    return value if isinstance(value, list) and value else None


def _cluster_mass(value) -> Optional[list]:
    """The weight mass per top-level cluster of a summarised weight list (thousands of fine domains)."""
    if isinstance(value, dict) and isinstance(value.get("mass_by_cluster"), dict) and value["mass_by_cluster"]:
        return list(value["mass_by_cluster"].values())
    return None


def _mean_series(runs: Sequence, key: str, extract=_as_list) -> List[dict]:
    """Per iteration logged by every run, the element-wise mean over runs of ``extract(metric[key])``
    (default: list metrics; summaries of thousands of domains are skipped)."""
    per_run = [{int(m["iteration"]): x for m in r.metrics if (x := extract(m.get(key))) is not None} for r in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    return [{"iteration": s, key: [sum(col) / len(col) for col in zip(*(p[s] for p in per_run))]} for s in steps]


def write_plots(results: Sequence, out: str) -> List[str]:
    """PNGs under ``out``: target eval loss per method (mean over seeds, min-max band); for each
    non-uniform method its domain weights over time (mean over seeds; per top-level cluster when
    thousands of fine domains are logged as summaries; basis weights too with --dga-basis); final
    epochs consumed per domain, one bar per method."""
    import os

    from megatron_dga.experiments.plots import plot_band, plot_domain_weights, plot_grouped_bars

    previous = os.path.join(out, PLOTS_FILE)
    newest_run = max(os.path.getmtime(os.path.join(r.run_dir, "metrics.jsonl")) for r in results)
    try:
        with open(previous, encoding="utf-8") as fh:
            listed = json.load(fh)
        if listed["runs"] == sorted(r.run_dir for r in results) and all(
            os.path.isfile(p) and os.path.getmtime(p) >= newest_run for p in listed["plots"]
        ):
            return listed["plots"]  # drawn from these very runs already
    except (OSError, ValueError, KeyError, TypeError):
        pass
    by_method: Dict[str, list] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    paths = [
        plot_band(
            {
                m: [
                    [
                        (int(x["iteration"]), x["specific_eval_loss"])
                        for x in r.metrics
                        if x.get("specific_eval_loss") is not None
                    ]
                    for r in runs
                ]
                for m, runs in by_method.items()
            },
            os.path.join(out, "target_loss.png"),
            "held-out target eval loss",
            "target eval loss by method (mean over seeds, band: min-max)",
        )
    ]
    names = list(results[0].info.get("domains") or []) if results else []
    for method, runs in by_method.items():
        if method == "uniform":
            continue
        seeds = f"mean over {len(runs)} seeds" if len(runs) > 1 else f"seed {runs[0].seed}"
        series, labels, what = _mean_series(runs, "domain_weights"), names, "domain weights"
        if not series:  # summarised (more domains than --log-domains-limit): the mass per top-level cluster
            series, what = _mean_series(runs, "domain_weights", _cluster_mass), "weight per top-level cluster"
            first = next(
                (
                    m["domain_weights"]
                    for r in runs
                    for m in r.metrics
                    if _cluster_mass(m.get("domain_weights")) is not None
                ),
                {},
            )
            labels = list(first.get("mass_by_cluster", {}))
        paths.append(
            plot_domain_weights(
                series, labels, os.path.join(out, f"weights_{method}.png"), title=f"{what}: {method} ({seeds})"
            )
        )
        basis = runs[0].info.get("basis_names")
        if basis:
            paths.append(
                plot_domain_weights(
                    _mean_series(runs, "basis_weights"),
                    basis,
                    os.path.join(out, f"basis_weights_{method}.png"),
                    title=f"basis weights: {method} ({seeds})",
                    key="basis_weights",
                )
            )
    epochs = {}
    for method, runs in by_method.items():
        last = [
            next((m["domain_epochs"] for m in reversed(r.metrics) if isinstance(m.get("domain_epochs"), list)), None)
            for r in runs
        ]
        last = [e for e in last if e]
        if last:
            epochs[method] = [sum(col) / len(col) for col in zip(*last)]
    if names and len(names) <= 64:
        paths.append(
            plot_grouped_bars(
                epochs,
                names,
                os.path.join(out, "epochs.png"),
                "epochs consumed",
                "epochs consumed per domain at the end (mean over seeds)",
            )
        )
    paths = [p for p in paths if p]
    atomic_write_json(previous, {"runs": sorted(r.run_dir for r in results), "plots": paths}, indent=1)
    return paths
