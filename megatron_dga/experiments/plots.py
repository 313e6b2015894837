"""PNG plots of runs from their metrics.jsonl entries (matplotlib, headless).

Used by examples/experiments.py (the method comparisons, the demo) and tools/plot_metrics.py.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: List[dict], key: str):
    # A list longer than --log-domains-limit is logged as a summary dict: not a series to plot per domain.
    rows = [(m["iteration"], m[key]) for m in metrics if m.get(key) is not None and not isinstance(m[key], dict)]
    return [r[0] for r in rows], [r[1] for r in rows]


def plot_domain_weights(
    metrics: List[dict], names: Sequence[str], path: str, title: str = "", key: str = "domain_weights"
) -> Optional[str]:
    """Stacked areas of the weights over iterations, one colour per domain."""
    steps, weights = _series(metrics, key)
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    columns = list(zip(*weights))
    cmap = plt.get_cmap("tab20" if len(columns) > 10 else "tab10")
    ax.stackplot(
        steps, columns, labels=list(names)[: len(columns)], colors=[cmap(i % cmap.N) for i in range(len(columns))]
    )
    ax.set_xlim(steps[0], steps[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("sampling weight")
    ax.set_title(title or "domain weights")
    if len(columns) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: Dict[str, List[dict]], key: str, path: str, ylabel: str, title: str = "") -> Optional[str]:
    """One line per run of metric ``key`` over iterations (e.g. specific_eval_loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for label, metrics in runs.items():
        steps, values = _series(metrics, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_alignments(metrics: List[dict], names: Sequence[str], path: str, title: str = "") -> Optional[str]:
    """Alignment a_i of each domain at every DGA update."""
    steps, values = _series(metrics, "alignments")
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, column in enumerate(zip(*values)):
        ax.plot(steps, column, label=names[i] if i < len(names) else str(i))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("<g_i, g_spe>")
    ax.set_title(title or "alignments")
    if len(values[0]) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_band(curves: Dict[str, List[List[tuple]]], path: str, ylabel: str, title: str = "") -> Optional[str]:
    """Per label, the mean over runs of a metric with a min-max band (one run: a plain line).

    Args:
        curves: label -> one list of ``(iteration, value)`` per run (e.g. per seed); the
            iterations common to all runs of a label are drawn.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = 0
    for label, runs in curves.items():
        runs = [dict(r) for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if not steps:
            continue
        values = [[r[s] for r in runs] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        (line,) = ax.plot(
            steps, mean, marker="o", markersize=3, label=label if len(runs) == 1 else f"{label} (mean of {len(runs)})"
        )
        if len(runs) > 1:
            ax.fill_between(
                steps,
                [min(v) for v in values],
                [max(v) for v in values],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grouped_bars(
    values: Dict[str, Sequence[float]], names: Sequence[str], path: str, ylabel: str, title: str = ""
) -> Optional[str]:
    """One group of bars per name (e.g. a domain), one bar per label (e.g. a method)."""
    values = {k: list(v) for k, v in values.items() if v}
    if not values:
        return None
    plt = _pyplot()
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * k * len(values) + 2), 4.5))
    width = 0.8 / len(values)
    for i, (label, v) in enumerate(values.items()):
        ax.bar([j + (i - (len(values) - 1) / 2) * width for j in range(len(v))], v, width, label=label)
    ax.set_xticks(range(k))
    ax.set_xticklabels(list(names), rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
