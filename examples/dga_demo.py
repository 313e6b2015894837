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
from typing import List

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


def train_args(data, weights: str, args) -> List[str]:
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
    ]


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
    from megatron_dga.experiment import results_table, run_pretrain, write_plots

    results = []
    for name in methods:
        print(f"\n=== {name}: python -m megatron_dga.pretrain_gpt {' '.join(METHODS[name])} ...", flush=True)
        argv = train_args(data, weights, args) + METHODS[name]
        results.append(run_pretrain(name, argv, os.path.join(args.out, "runs", name), threads=args.threads))
    print("\n" + results_table(results, "Held-out target (Python language reference) loss, lower is better:\n"))
    plots = write_plots(results, list(data.domains), args.out)
    print("\nplots:\n" + "\n".join(f"  {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
