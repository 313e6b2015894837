"""Running and comparing several pretraining jobs: the glue of the demo and the experiment runner.

Each method is a real ``python -m megatron_dga.pretrain_gpt`` process (optionally under
torchrun); results are read back from its metrics.jsonl, never from a file of numbers.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from megatron_dga.training.metrics import read_metrics


@dataclass
class RunResult:
    name: str
    run_dir: str
    seconds: float
    metrics: List[dict] = field(default_factory=list)

    def evals(self, key: str = "specific_eval_loss") -> List[float]:
        return [m[key] for m in self.metrics if m.get(key) is not None]


def run_pretrain(name: str, argv: Sequence[str], run_dir: str, *, threads: int = 1, nproc: int = 1,
                 echo: bool = True) -> RunResult:
    """Run one training job to completion, streaming its Megatron log lines; raise on failure."""
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "megatron_dga.pretrain_gpt"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "megatron_dga.pretrain_gpt"]
    start = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "w") as log:
        proc = subprocess.Popen([*launcher, *argv, "--log-dir", run_dir], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if echo and (line.startswith("[20") or line.startswith("error") or "Error" in line):
                text = line.rstrip()
                print(f"  {name:>12} | {text[22:] if text.startswith('[20') else text}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {run_dir}/stdout.log")
    seconds = time.time() - start
    return RunResult(name, run_dir, seconds, read_metrics(os.path.join(run_dir, "metrics.jsonl")))


def results_table(results: Sequence[RunResult], title: str = "") -> str:
    """Markdown table: final and best held-out target loss, mean generic eval loss, wall time."""
    rows = []
    for r in results:
        evals = r.evals()
        last_eval = next((m for m in reversed(r.metrics) if m.get("specific_eval_loss") is not None), {})
        generic = last_eval.get("domain_eval_loss") or []
        rows.append((r.name, evals[-1] if evals else float("nan"), min(evals) if evals else float("nan"),
                     sum(generic) / len(generic) if generic else float("nan"), r.seconds))
    best = min(row[1] for row in rows)
    lines = [title] if title else []
    lines += ["| method | final target eval loss | best target eval loss | mean generic eval loss | wall time |",
              "|---|---:|---:|---:|---:|"]
    for name, final, best_seen, generic, secs in rows:
        mark = " *" if final == best else ""
        lines.append(f"| {name} | {final:.4f}{mark} | {best_seen:.4f} | {generic:.4f} | {secs:.0f} s |")
    return "\n".join(lines)


def write_plots(results: Sequence[RunResult], names: Sequence[str], out: str,
                basis_names: Optional[Sequence[str]] = None) -> List[str]:
    """Target-loss curves of all runs and, per non-uniform run, its weights over time."""
    from megatron_dga.plots import plot_curves, plot_domain_weights

    paths = [plot_curves({r.name: r.metrics for r in results}, "specific_eval_loss",
                         os.path.join(out, "target_loss.png"), "held-out target loss", "target eval loss by method")]
    for r in results:
        if r.name == "uniform":
            continue
        paths.append(plot_domain_weights(r.metrics, names, os.path.join(out, f"weights_{r.name}.png"),
                                         title=f"domain weights: {r.name}"))
        if basis_names and any("basis_weights" in m for m in r.metrics):
            paths.append(plot_domain_weights(r.metrics, basis_names, os.path.join(out, f"basis_weights_{r.name}.png"),
                                             title=f"basis weights: {r.name}", key="basis_weights"))
    return [p for p in paths if p]
