"""DGA demo on the embedded default corpus: which mixture makes a small GPT best at the target?

Builds the default corpus from this Python installation (8 generic domains + a small
held-out target set, the language reference), computes CRISP importance weights, then
trains the same tiny megatron-core GPT four times on CPU and compares the target's
held-out loss:

    uniform      every domain equally often
    importance   fixed histogram of the target's nearest domains (tools/importance_weights.py)
    dga          online reweighting by gradient alignment, no EMA (--dga-ema 1)
    dga_ema      DGA with EMA beta = 0.1 (our convention; see docs/algorithm.md)

Each run is a real `python -m megatron_dga.pretrain_gpt` job. Prints a table made from the
runs' metrics.jsonl, and writes PNG plots (weights over time, target loss curves).

    python examples/dga_demo.py --out runs/demo [--train-iters 300] [--methods uniform,dga_ema]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

METHODS = {
    "uniform": ["--mixing", "uniform"],
    "importance": ["--mixing", "importance"],
    "dga": ["--mixing", "dga", "--dga-ema", "1.0"],
    "dga_ema": ["--mixing", "dga", "--dga-ema", "0.1"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (data, runs, plots)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dga-interval", type=int, default=10, help="T_r")
    p.add_argument("--dga-eta", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    return p.parse_args(argv)


def prepare(out: str):
    from megatron_dga.data.default_corpus import prepare_default_data

    data = prepare_default_data(os.path.join(out, "data"), log=lambda msg: print(f"[data] {msg}", flush=True))
    weights = os.path.join(out, "importance_weights.json")
    if not os.path.exists(weights):
        print("[data] importance weights of the target over the domains (TF-IDF nearest centroid)", flush=True)
        subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(__file__), "..", "tools", "importance_weights.py"),
             "--labelled-domains", os.path.dirname(next(iter(data.domain_jsonl.values()))),
             "--specific", data.target_train_jsonl, "--output", weights, "--smoothing", "0.02"],
            check=True,
        )
    return data, weights


def train_args(data, weights: str, args, run_dir: str) -> List[str]:
    domains = [data.domain_prefixes[d] for d in data.domains]
    model = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
             "--position-embedding-type", "rope"]
    optim = ["--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "20", "--lr-decay-style", "cosine",
             "--weight-decay", "0.1", "--clip-grad", "1.0"]
    batch = ["--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", str(args.train_iters)]
    dga = ["--dga-interval", str(args.dga_interval), "--dga-eta", str(args.dga_eta),
           "--dga-domain-batch-size", "4", "--dga-specific-batch-size", "8"]
    return [
        "--data-path", *domains,
        "--specific-data-path", data.target_train_prefix, "--specific-eval-data-path", data.target_eval_prefix,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data.tokenizer_model,
        "--importance-weights", weights, "--seed", str(args.seed),
        *model, *optim, *batch, *dga,
        "--log-interval", "10", "--eval-interval", str(args.eval_interval), "--eval-iters", "2",
        "--log-dir", run_dir,
    ]


def run_method(name: str, base: List[str], run_dir: str, threads: int) -> float:
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    print(f"\n=== {name}: python -m megatron_dga.pretrain_gpt {' '.join(METHODS[name])} ...", flush=True)
    with open(os.path.join(run_dir, "stdout.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_dga.pretrain_gpt", *base, *METHODS[name]],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[") or line.startswith("error") or "Traceback" in line:
                print(f"  {name:>10} | {line.rstrip()[22:] if line.startswith('[') else line.rstrip()}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {run_dir}/stdout.log")
    return time.time() - start


def report(results: Dict[str, dict], names: List[str], out: str) -> None:
    from megatron_dga.plots import plot_curves, plot_domain_weights

    rows = []
    for name, r in results.items():
        evals = [m for m in r["metrics"] if m.get("specific_eval_loss") is not None]
        last = evals[-1]
        rows.append((name, last["specific_eval_loss"], min(m["specific_eval_loss"] for m in evals),
                     float(sum(last["domain_eval_loss"]) / len(last["domain_eval_loss"])), r["seconds"]))
    best = min(r[1] for r in rows)
    print("\nTarget (held-out language reference) loss after training, lower is better:\n")
    print(f"| method     | final target eval loss | best target eval loss | mean generic eval loss | wall time |")
    print(f"|------------|-----------------------:|----------------------:|-----------------------:|----------:|")
    for name, final, best_seen, generic, secs in rows:
        mark = " *" if final == best else ""
        print(f"| {name:<10} | {final:>20.4f}{mark:2} | {best_seen:>21.4f} | {generic:>22.4f} | {secs:>7.0f} s |")
    plots = [plot_curves({n: r["metrics"] for n, r in results.items()}, "specific_eval_loss",
                         os.path.join(out, "target_loss.png"), "held-out target loss", "target eval loss by method")]
    for name, r in results.items():
        if name.startswith("dga") or name == "importance":
            plots.append(plot_domain_weights(r["metrics"], names, os.path.join(out, f"weights_{name}.png"),
                                             title=f"domain weights: {name}"))
    print("\nplots:\n" + "\n".join(f"  {p}" for p in plots if p))


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: --methods {unknown} unknown; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    data, weights = prepare(args.out)
    with open(weights) as fh:
        w = json.load(fh)
    print("[data] importance weights: " + ", ".join(f"{d}={x:.2f}" for d, x in zip(w["domains"], w["weights"])))
    from megatron_dga.training.metrics import read_metrics

    results = {}
    for name in methods:
        run_dir = os.path.join(args.out, "runs", name)
        seconds = run_method(name, train_args(data, weights, args, run_dir), run_dir, args.threads)
        results[name] = {"metrics": read_metrics(os.path.join(run_dir, "metrics.jsonl")), "seconds": seconds}
    report(results, list(data.domains), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
