"""Plot weights, alignments and losses of one or more runs from metrics.jsonl or TensorBoard logs.

    # the runs of the demo (scripts/demo.sh: examples/experiments.py token-limited --out runs/demo)
    python tools/plot_metrics.py runs/demo/token-limited/runs/*/seed1234 --out plots/
    python tools/plot_metrics.py logs/ --out plots/          # one run's --log-dir
    python tools/plot_metrics.py tb/ --out plots/            # a --tensorboard-dir

For each run directory (a --log-dir holding metrics.jsonl and run_info.json, or a
--tensorboard-dir with event files) this writes <name>_weights.png (stacked domain weights), <name>_alignments.png
(DGA runs) and, over all runs, train_loss.png and specific_eval_loss.png. <name> is the directory's
name, with as many parent directories as it takes to tell the runs apart (dga_ema_seed1234 and
uniform_seed1234 for the command above).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Sequence

from megatron_dga.errors import DGAError
from megatron_dga.fileio import ensure_writable_dir
from megatron_dga.logging_setup import setup_logging
from megatron_dga.experiments.plots import plot_alignments, plot_curves, plot_domain_weights
from megatron_dga.training.metrics import read_metrics, read_tensorboard


def load_run(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    info_path = os.path.join(run_dir, "run_info.json")
    names = None
    if os.path.isfile(info_path):
        with open(info_path) as fh:
            names = json.load(fh).get("domains")
    if os.path.isfile(path):
        metrics = read_metrics(path)
    elif any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir)):
        metrics = read_tensorboard(run_dir, labels=names)
    else:
        raise DGAError(f"{run_dir}: no metrics.jsonl and no TensorBoard events (give a --log-dir or --tensorboard-dir)")
    if names is None:
        k = len(next((m["domain_weights"] for m in metrics if "domain_weights" in m), []))
        names = [f"domain{i}" for i in range(k)]
    return metrics, names


def run_names(run_dirs: Sequence[str]) -> List[str]:
    """A distinct name per run directory: its basename, extended by its parents' names ("_"-joined)
    until no two runs share one (runs/x/dga/seed1 and runs/x/uniform/seed1 -> dga_seed1, uniform_seed1)."""
    parts = [os.path.abspath(d).strip(os.sep).split(os.sep) for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["_".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise DGAError(f"runs {list(run_dirs)} are given more than once; name each run directory once")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (the runs' --log-dir)")
    p.add_argument("--out", default=None, help="output directory (default: the first run directory)")
    args = p.parse_args(argv)
    setup_logging()
    out = args.out or args.runs[0]
    try:
        ensure_writable_dir(out, "--out" if args.out else "--out (default: the first run directory)")
        runs = {name: load_run(r) for name, r in zip(run_names(args.runs), args.runs)}
    except (DGAError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = []
    for name, (metrics, names) in runs.items():
        written.append(
            plot_domain_weights(metrics, names, os.path.join(out, f"{name}_weights.png"), f"{name}: domain weights")
        )
        written.append(
            plot_alignments(metrics, names, os.path.join(out, f"{name}_alignments.png"), f"{name}: alignments")
        )
    series = {name: metrics for name, (metrics, _) in runs.items()}
    written.append(plot_curves(series, "lm_loss", os.path.join(out, "train_loss.png"), "training loss"))
    written.append(
        plot_curves(series, "specific_eval_loss", os.path.join(out, "specific_eval_loss.png"), "held-out target loss")
    )
    for path in written:
        if path:
            print(path)
    return 0
