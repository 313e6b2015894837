"""Downstream accuracy of a checkpoint with lm-evaluation-harness (needs the eval extra: pip install '.[eval]').

    python tools/evaluate.py --load runs/dga/ckpt --tasks arc_easy,hellaswag,piqa,sciq,mmlu \\
        --output runs/dga/downstream.json

The model and tokenizer come from the run's run_info.json (beside or above --load); trainer flags
after the options override them (a converted checkpoint: its tokenizer flags and
$(cat CONVERTED/model_flags.txt)). --tasks takes lm_eval task/group names and directories of task
YAMLs with local data files (offline). Launched like the trainer, it evaluates on that layout:

    torchrun --nproc-per-node 4 tools/evaluate.py --load CKPT --tasks mmlu \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Multiple-choice (loglikelihood) and perplexity (loglikelihood_rolling) tasks; the library is
``megatron_dga.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint root (the training run's --save)")
    p.add_argument(
        "--tasks",
        required=True,
        nargs="+",
        help="lm_eval task/group names and/or directories of task YAMLs (comma- or space-separated)",
    )
    p.add_argument("--output", default=None, help="write the results here as JSON (default: print only)")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration to evaluate (default: the latest)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    p.add_argument("--limit", type=float, default=None, help="items per task (or a fraction < 1; default: all)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="requests per forward call (default: 32)")
    p.add_argument("--eval-micro-batch-size", type=int, default=8, help="sequences per micro-batch (default: 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed of few-shot sampling (default: 1234)")
    return p


def main(argv=None) -> int:
    args, trainer_argv = build_parser().parse_known_args(argv)
    setup_logging(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint's deprecations
    from megatron_dga import evaluation

    try:
        job = evaluation.EvalJob(
            load=args.load,
            ckpt_step=args.ckpt_step,
            overrides=evaluation.trainer_overrides(trainer_argv),
            eval=evaluation.EvalConfig(
                tasks=[t for entry in args.tasks for t in entry.split(",")],
                num_fewshot=args.num_fewshot,
                limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
                batch_size=args.eval_batch_size,
                micro_batch_size=args.eval_micro_batch_size,
                seed=args.seed,
            ),
        )
        result = evaluation.evaluate_checkpoint(job, args.output)
    except DGAError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank has the same results
        print(json.dumps({"iteration": result["iteration"], "results": result["results"]}, indent=1))
    return 0
