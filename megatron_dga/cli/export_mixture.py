"""Export the mixture a run learned (e.g. --mixing dga on a small proxy model) to train another model on it.

    # the time-averaged weights of a DGA run, as a weights file (for --dga-init FILE, --mixing importance)
    python tools/export_mixture.py runs/proxy --output mixture.json
    # as Megatron's --data-path value, for a static run of the big model
    python tools/export_mixture.py runs/proxy --format data-path --output mixture.txt
    python -m megatron_dga.pretrain_gpt --data-args-path mixture.txt --mixing static ...
    # the final weights; the average over iterations 200..1000; the trajectory piece by piece
    python tools/export_mixture.py runs/proxy --statistic final --output final.json
    python tools/export_mixture.py runs/proxy --window 200:1000 --output late.json
    python tools/export_mixture.py runs/proxy --format schedule --output schedule.json

LOG_DIR_OR_CKPT is the run's --log-dir (metrics.jsonl, run_info.json), or its checkpoint directory
(--save) when the log lies there or one level up (the experiment runner's <run>/ckpt).

Time-averaged: the mean over the training steps t in the window of the mixture w(t) that step t's
global batch was drawn from, each step weighted by the samples it drew:
sum_t n_t w(t) / sum_t n_t. Trained with --mixing static for as many steps, a run draws, in
expectation, the source run's samples per domain. The window --window START:END is the steps
START+1 .. END (iterations; default 0:<last logged iteration>). Every step's mixture is known
exactly from metrics.jsonl when --log-interval <= --dga-interval; otherwise the tool refuses.

Formats: weights (the weights-v1 JSON, default), data-path (the --data-path W1 P1 ... value, read by
--data-args-path FILE with --mixing static), schedule (JSON: the steps (a, b] of each piece and its
weights; no trainer flag reads it yet). The exported vector is the one its consumer keeps bit for bit
(--mixing static then logs exactly these weights); meta.raw_weights holds the float64 average.

With --dga-basis, --space basis exports the N weights over the basis distributions instead of the
K domain weights (needed when K exceeds --log-domains-limit and metrics.jsonl holds summaries).
"""

from __future__ import annotations

import argparse
import sys

from megatron_dga.errors import DGAError, DataError
from megatron_dga.logging_setup import setup_logging
from megatron_dga.mixing import export


def parse_window(text: str):
    start, sep, end = text.partition(":")
    try:
        return int(start or 0), (int(end) if end else None)
    except ValueError:
        raise DataError(
            f"--window {text!r}: write START:END in iterations (e.g. 200:1000, or 200: to the end)"
        ) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="LOG_DIR_OR_CKPT", help="the run's --log-dir, or its --save directory")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--format", choices=export.FORMATS, default="weights", help="default: weights")
    p.add_argument(
        "--statistic",
        choices=export.STATISTICS,
        default="time-average",
        help="time-average (default) or final (the weights after the last logged step)",
    )
    p.add_argument(
        "--window",
        default=None,
        metavar="START:END",
        help="average over the steps START+1 .. END only (iterations; default: the whole run)",
    )
    p.add_argument(
        "--space",
        choices=export.SPACES,
        default="domains",
        help="domains (the K sampling weights, default) or basis (the N weights of --dga-basis)",
    )
    args = p.parse_args(argv)
    setup_logging()
    try:
        window = parse_window(args.window) if args.window else None
        exp = export.export_mixture(
            args.run, statistic=args.statistic, space=args.space, window=window, schedule=args.format == "schedule"
        )
        data_path = None
        if args.format == "data-path":
            data_path = (export.read_run(exp.meta["source"]).config.get("data") or {}).get("data_path")
        export.write_export(exp, args.output, args.format, data_path=data_path)
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = exp.meta["statistic"] + (
        f" over steps {exp.meta['window'][0] + 1}..{exp.meta['window'][1]}"
        if "window" in exp.meta
        else f" at iteration {exp.meta.get('iteration')}"
    )
    print(f"wrote {args.output} ({args.format}, {len(exp.names)} {args.space}, {what})")
    return 0
