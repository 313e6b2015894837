"""The paper's two scenarios at small scale, on the embedded default corpus or your own shards.

  token-limited   every generic domain is capped (--domain-token-limit), as in the paper's
                  30M-tokens-per-domain regime: importance sampling keeps drawing the few domains
                  nearest the target and repeats them epoch after epoch; DGA sees their gradients
                  shrink as they are overfit and moves weight on.
  fine-grained    little specific data (--specific-docs documents) and many fine domains from
                  hierarchical k-means (--fine-clusters 8 4 -> 32); DGA runs on N basis
                  distributions (the coarse domains' importance histograms over the fine
                  domains: distribution reweighting), beside importance sampling on the fine
                  domains and uniform.

Each method is a real pretraining job; the markdown table and plots come from their
metrics.jsonl. Presets: cpu (a 0.7M-parameter GPT, minutes on 2 cores) and gpu (a 125M GPT in
bf16, one process per visible GPU).

    python examples/experiments.py token-limited --out runs/exp
    python examples/experiments.py fine-grained --out runs/exp --preset gpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

from megatron_dga.experiment import results_table, run_pretrain, write_plots

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")

PRESETS = {
    "cpu": {
        "model": ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
                  "--position-embedding-type", "rope"],
        "batch": ["--micro-batch-size", "16", "--global-batch-size", "16"],
        "optim": ["--lr", "2e-3", "--min-lr", "2e-4", "--weight-decay", "0.1"],
        "train_iters": 600,
        "token_limit": 40_000,
        "dga": ["--dga-domain-batch-size", "4", "--dga-specific-batch-size", "8"],
    },
    "gpu": {
        "model": ["--num-layers", "12", "--hidden-size", "768", "--num-attention-heads", "12", "--seq-length", "1024",
                  "--position-embedding-type", "rope", "--bf16"],
        "batch": ["--micro-batch-size", "8", "--global-batch-size", "64"],
        "optim": ["--lr", "6e-4", "--min-lr", "6e-5", "--weight-decay", "0.1"],
        "train_iters": 3000,
        "token_limit": 2_000_000,
        "dga": ["--dga-domain-batch-size", "8", "--dga-specific-batch-size", "32"],
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenario", choices=["token-limited", "fine-grained"])
    p.add_argument("--out", default="runs/experiments")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--train-iters", type=int, default=None, help="default: the preset's")
    p.add_argument("--token-limit", type=int, default=None, help="token-limited: tokens per domain (default: preset's)")
    p.add_argument("--fine-clusters", type=int, nargs="+", default=[8, 4], help="fine-grained: k1 k2 [k3]")
    p.add_argument("--specific-docs", type=int, default=60, help="fine-grained: specific documents kept")
    p.add_argument("--methods", default=None, help="comma-separated subset of the scenario's methods")
    p.add_argument("--dga-interval", type=int, default=10, help="T_r")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def _tool(name: str, *args: str) -> None:
    subprocess.run([sys.executable, os.path.join(TOOLS, name), *args], check=True)


def common_args(data, preset: dict, args) -> List[str]:
    iters = args.train_iters or preset["train_iters"]
    # Warmup over the first 1/30 of the run (20 of the CPU preset's 600 iterations), so a
    # shortened run keeps megatron's warmup < decay length.
    warmup = iters // 30
    return [
        "--lr-warmup-iters", str(warmup),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data.tokenizer_model,
        "--seed", str(args.seed), "--train-iters", str(iters), *preset["model"], *preset["batch"], *preset["optim"],
        "--log-interval", "10", "--eval-interval", str(max(iters // 12, 10)), "--eval-iters", "2",
    ]


def dga_args(preset: dict, args) -> List[str]:
    """The DGA flags (the trainer refuses them without --mixing dga)."""
    return ["--mixing", "dga", "--dga-interval", str(args.dga_interval), "--dga-eta", "10", *preset["dga"]]


def token_limited(data, preset: dict, args, out: str) -> Dict[str, List[str]]:
    weights = os.path.join(out, "importance_weights.json")
    if not os.path.exists(weights):
        _tool("importance_weights.py", "--labelled-domains", os.path.dirname(next(iter(data.domain_jsonl.values()))),
              "--specific", data.target_train_jsonl, "--output", weights, "--smoothing", "0.02", "--no-progress")
    base = ["--data-path", *[data.domain_prefixes[d] for d in data.domains],
            "--specific-data-path", data.target_train_prefix, "--specific-eval-data-path", data.target_eval_prefix,
            "--domain-token-limit", str(args.token_limit or preset["token_limit"]), *common_args(data, preset, args)]
    return {
        "uniform": base + ["--mixing", "uniform"],
        "importance": base + ["--mixing", "importance", "--importance-weights", weights],
        "dga": base + [*dga_args(preset, args), "--dga-ema", "1.0"],
        "dga_ema": base + [*dga_args(preset, args), "--dga-ema", "0.1"],
    }


def fine_grained(data, preset: dict, args, out: str) -> Dict[str, List[str]]:
    fine_dir, shard_dir = os.path.join(out, "fine_domains"), os.path.join(out, "fine_shards")
    corpus_dir = os.path.dirname(next(iter(data.domain_jsonl.values())))
    if not os.path.exists(os.path.join(fine_dir, "manifest.json")):
        _tool("cluster_domains.py", "--input", corpus_dir, "--output", fine_dir,
              "--num-clusters", *map(str, args.fine_clusters), "--seed", str(args.seed), "--no-progress")
    manifest = json.load(open(os.path.join(fine_dir, "manifest.json")))
    fine = list(manifest["domains"])
    # Little specific data: the first --specific-docs documents of the target's training split.
    small = os.path.join(out, "specific_small.jsonl")
    with open(data.target_train_jsonl) as src, open(small, "w") as dst:
        for i, line in enumerate(src):
            if i >= args.specific_docs:
                break
            dst.write(line)
    tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data.tokenizer_model, "--append-eod"]
    if not os.path.exists(os.path.join(shard_dir, f"{fine[-1]}_text_document.idx")):
        _tool("preprocess_data.py", "--input", fine_dir, "--output-prefix", shard_dir, *tok, "--no-progress")
    small_prefix = os.path.join(out, "specific_small")
    _tool("preprocess_data.py", "--input", small, "--output-prefix", small_prefix, *tok, "--no-progress")
    weights, basis = os.path.join(out, "fine_importance.json"), os.path.join(out, "basis.npz")
    coarse_sets = [f"{d}={data.domain_jsonl[d]}" for d in data.domains]
    _tool("importance_weights.py", "--clusters", fine_dir, "--specific", small, "--output", weights,
          "--smoothing", "0.02", "--basis-sets", *coarse_sets, "--basis-output", basis, "--basis-smoothing", "0.01",
          "--no-progress")
    base = ["--data-path", *[os.path.join(shard_dir, f"{d}_text_document") for d in fine],
            "--specific-data-path", small_prefix + "_text_document",
            "--specific-eval-data-path", data.target_eval_prefix, *common_args(data, preset, args),
            # Some fine clusters hold a handful of documents: no per-domain held-out part.
            "--split", "100,0"]
    return {
        "uniform": base + ["--mixing", "uniform"],
        "importance": base + ["--mixing", "importance", "--importance-weights", weights],
        "dga_basis": base + [*dga_args(preset, args), "--dga-ema", "0.1", "--dga-basis", basis],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    out = os.path.abspath(os.path.join(args.out, args.scenario))
    os.makedirs(out, exist_ok=True)
    from megatron_dga.prep.default_corpus import prepare_default_data

    data = prepare_default_data(os.path.join(os.path.abspath(args.out), "data"))
    jobs = (token_limited if args.scenario == "token-limited" else fine_grained)(data, preset, args, out)
    chosen = [m.strip() for m in args.methods.split(",")] if args.methods else list(jobs)
    unknown = [m for m in chosen if m not in jobs]
    if unknown:
        print(f"error: --methods {unknown} unknown for {args.scenario}; choose from {list(jobs)}", file=sys.stderr)
        return 2
    nproc = 1
    if args.preset == "gpu":
        import torch

        nproc = max(torch.cuda.device_count(), 1)
    results = []
    for name in chosen:
        print(f"\n=== {args.scenario} / {name}", flush=True)
        results.append(run_pretrain(name, jobs[name], os.path.join(out, "runs", name), threads=args.threads,
                                    nproc=nproc))
    names = json.load(open(os.path.join(results[0].run_dir, "run_info.json")))["domains"]
    basis_names = None
    for r in results:
        info = json.load(open(os.path.join(r.run_dir, "run_info.json")))
        basis_names = basis_names or info.get("basis_names")
    table = results_table(results, f"### {args.scenario} ({args.preset} preset)\n")
    plots = write_plots(results, names, out, basis_names)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(table + "\n\nPlots:\n" + "\n".join(f"- {os.path.relpath(p, out)}" for p in plots) + "\n")
    print("\n" + table + "\n\nwritten: " + os.path.join(out, "results.md"))
    for p in plots:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
