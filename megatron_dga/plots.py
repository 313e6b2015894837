"""PNG plots of runs from their metrics.jsonl entries (matplotlib, headless).

Used by megatron_dga/experiment.py (examples/experiments.py, the demo) and tools/plot_metrics.py.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(metrics: List[dict], key: str):
    rows = [(m["iteration"], m[key]) for m in metrics if m.get(key) is not None]
    return [r[0] for r in rows], [r[1] for r in rows]


def plot_domain_weights(metrics: List[dict], names: Sequence[str], path: str, title: str = "",
                        key: str = "domain_weights") -> Optional[str]:
    """Stacked areas of the weights over iterations, one colour per domain."""
    steps, weights = _series(metrics, key)
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    columns = list(zip(*weights))
    cmap = plt.get_cmap("tab20" if len(columns) > 10 else "tab10")
    ax.stackplot(steps, columns, labels=list(names)[: len(columns)], colors=[cmap(i % cmap.N) for i in range(len(columns))])
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
