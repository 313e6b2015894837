"""Trainer tokens/s, static mixing and DGA side by side in one run, with the cost model.

Writes random-token shards with megatron-core's IndexedDatasetBuilder, then trains the same
GPT twice through ``python -m megatron_dga.pretrain_gpt`` (static mixing, then DGA every
--dga-interval steps) and prints steady-state tokens/s (the first log window, with
compilation and allocator warm-up, is left out), the measured DGA overhead and the cost
model's (k b_dom + b_spe) / (T_r B). Lines starting with ``RESULT`` are what
``scripts/gpu_check.sh`` puts in its table.

    python benchmarks/bench_train_throughput.py                 # GPU: ~125M-parameter GPT, bf16
    python benchmarks/bench_train_throughput.py --preset tiny   # CPU: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from megatron_dga.mixing.cost_model import dga_overhead

PRESETS = {
    # GPT-2 small shape; micro-batch 8 x 1024 tokens.
    "gpu": dict(
        layers=12, hidden=768, heads=12, seq=1024, vocab=32000, micro_batch=8, batch=32, iters=40, extra=["--bf16"]
    ),
    "tiny": dict(layers=2, hidden=64, heads=4, seq=64, vocab=512, micro_batch=4, batch=8, iters=20, extra=[]),
}


def write_random_shards(out_dir: str, k: int, vocab: int, tokens_per_domain: int, doc_len: int) -> list:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefixes = []
    for name in [f"dom{i}" for i in range(k)] + ["specific"]:
        prefix = os.path.join(out_dir, f"{name}_text_document")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
        for _ in range(max(1, tokens_per_domain // doc_len)):
            doc = rng.integers(0, vocab - 1, size=doc_len)
            doc[-1] = vocab - 1  # eod
            builder.add_document(doc, [doc_len])
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def run(prefixes, p, log_dir, mixing_args) -> list:
    argv = [
        sys.executable,
        "-m",
        "megatron_dga.pretrain_gpt",
        "--data-path",
        *prefixes[:-1],
        "--specific-data-path",
        prefixes[-1],
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(p["vocab"] - 1),
        "--num-layers",
        str(p["layers"]),
        "--hidden-size",
        str(p["hidden"]),
        "--num-attention-heads",
        str(p["heads"]),
        "--seq-length",
        str(p["seq"]),
        "--micro-batch-size",
        str(p["micro_batch"]),
        "--global-batch-size",
        str(p["batch"]),
        "--train-iters",
        str(p["iters"]),
        "--log-interval",
        "5",
        "--eval-interval",
        "0",
        "--lr",
        "3e-4",
        "--log-dir",
        log_dir,
        *p["extra"],
        *mixing_args,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(log_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model/batch preset (default: gpu with CUDA, tiny without)",
    )
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--dga-interval", type=int, default=10)
    parser.add_argument("--out", default=None, help="directory for shards and logs (default: a temp dir)")
    args = parser.parse_args()
    import torch

    p = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "tiny")]
    out = args.out or tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(out, exist_ok=True)
    prefixes = write_random_shards(
        out, args.domains, p["vocab"], tokens_per_domain=p["batch"] * p["seq"] * 20, doc_len=p["seq"] + 1
    )
    b_dom, b_spe = 8, 16
    dga = [
        "--mixing",
        "dga",
        "--dga-interval",
        str(args.dga_interval),
        "--dga-domain-batch-size",
        str(b_dom),
        "--dga-specific-batch-size",
        str(b_spe),
    ]
    results = {}
    for name, mixing in (("static", ["--mixing", "uniform"]), ("dga", dga)):
        metrics = run(prefixes, p, os.path.join(out, name), mixing)
        steady = [m for m in metrics[1:] if "tokens_per_sec" in m]  # first window: warm-up
        results[name] = float(np.mean([m["tokens_per_sec"] for m in steady]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    shape = (
        f"{p['layers']}x{p['hidden']}, seq {p['seq']}, batch {p['batch']}{' bf16' if '--bf16' in p['extra'] else ''}"
    )
    model = dga_overhead(args.domains, b_dom, b_spe, args.dga_interval, p["batch"])
    print(f"RESULT tokens/s static mixing ({shape}, {device}): {results['static']:,.0f}")
    print(f"RESULT tokens/s DGA every {args.dga_interval} steps: {results['dga']:,.0f}")
    print(f"RESULT DGA overhead measured / cost model: {results['static'] / results['dga'] - 1:.1%} / {model:.1%}")


if __name__ == "__main__":
    main()
