"""Hugging Face <-> megatron-dga checkpoints (Llama, Mistral, Qwen2, GPT-2), for continued pretraining.

to-megatron: a local Hugging Face model directory -> a model-only torch_dist checkpoint that
``--load DIR --finetune`` reads on any TP/PP layout, plus DIR/model_flags.txt (the trainer's model
flags, derived from config.json):

    python tools/convert_hf_checkpoint.py to-megatron --hf-dir hf/Llama-3.2-1B --output ckpt/llama-1b \\
        --seq-length 4096 --tensor-model-parallel-size 2

to-hf: a torch_dist checkpoint of ours (converted or trained) -> a Hugging Face directory
(config.json, model.safetensors, the reference's tokenizer files) for evaluation elsewhere:

    python tools/convert_hf_checkpoint.py to-hf --load runs/dga/ckpt --hf-reference hf/Llama-3.2-1B \\
        --output hf/llama-1b-dga

The model of to-hf comes from --hf-reference (the original directory's config.json) and/or the
training run's model flags given after the options, e.g. ``$(cat ckpt/llama-1b/model_flags.txt)``.
Runs as one process on CPU (no GPU needed); the library is ``megatron_dga.convert.hf``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from megatron_dga.errors import ConfigError, DGAError
from megatron_dga.logging_setup import setup_logging

logger = logging.getLogger("convert_hf_checkpoint")

DTYPES = ("auto", "fp32", "bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/convert_hf_checkpoint.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    to_megatron = sub.add_parser("to-megatron", help="Hugging Face directory -> torch_dist checkpoint for --load")
    to_megatron.add_argument(
        "--hf-dir",
        required=True,
        help="local Hugging Face model directory (config.json, "
        "*.safetensors or pytorch_model*.bin; tokenizer.json for the vocabulary)",
    )
    to_megatron.add_argument("--output", required=True, help="new or empty directory: the trainer's --load")
    to_megatron.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="--seq-length of the training run (default: max_position_embeddings, at most 4096)",
    )
    to_megatron.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP of the training run: checked against the model, and the vocabulary is padded "
        "to a multiple of --make-vocab-size-divisible-by x TP as the trainer pads it",
    )
    to_megatron.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="PP of the training run (checked against the layers; the checkpoint loads on any PP)",
    )
    to_megatron.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="as the trainer's flag (the same value must be given there)",
    )
    to_megatron.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="stored precision; auto: bf16 for a bf16 model, fp32 otherwise"
    )

    to_hf = sub.add_parser(
        "to-hf",
        help="torch_dist checkpoint of ours -> Hugging Face directory",
        description="Model flags of the training run (e.g. $(cat CONVERTED/model_flags.txt)) may "
        "follow the options; they override --hf-reference's config.json.",
    )
    to_hf.add_argument("--load", required=True, help="checkpoint root (a --save directory, or to-megatron's output)")
    to_hf.add_argument("--ckpt-step", type=int, default=None, help="iteration to convert (default: the latest)")
    to_hf.add_argument("--output", required=True, help="new or empty directory for the Hugging Face model")
    to_hf.add_argument(
        "--hf-reference",
        default=None,
        help="the Hugging Face directory the model was converted from: its config.json is the base "
        "of the written one, its tokenizer files are copied",
    )
    to_hf.add_argument(
        "--tokenizer-model", default=None, help="a Hugging Face tokenizer directory to copy (default: --hf-reference's)"
    )
    to_hf.add_argument(
        "--hf-architecture",
        default=None,
        help="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel "
        "(default: --hf-reference's, else what the model flags compute)",
    )
    to_hf.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="written precision; auto: --hf-reference's, else the checkpoint's",
    )
    return parser


def _dtype(name: str):
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def run(args, model_argv) -> None:
    from megatron_dga import platform
    from megatron_dga.convert import hf

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError(
            "run the converter as one process (python tools/convert_hf_checkpoint.py, not torchrun); "
            "its torch_dist checkpoint reshards onto any TP/PP layout at --load"
        )
    if args.command == "to-megatron" and model_argv:
        raise ConfigError(f"to-megatron takes no model flags ({' '.join(model_argv)}): they come from config.json")
    flags = hf.model_flag_values(model_argv) if model_argv else None
    platform.initialize(platform.ParallelConfig())
    try:
        if args.command == "to-megatron":
            facts = hf.to_megatron(
                args.hf_dir,
                args.output,
                seq_length=args.seq_length,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                dtype=_dtype(args.dtype),
            )
            print(hf.describe_conversion(facts, args.output, args.hf_dir))
        else:
            out = hf.to_hf(
                args.load,
                args.output,
                model_flags_given=flags,
                reference_dir=args.hf_reference,
                tokenizer_dir=args.tokenizer_model,
                architecture=args.hf_architecture,
                ckpt_step=args.ckpt_step,
                dtype=_dtype(args.dtype),
            )
            print(f"wrote {out} (load it with transformers' AutoModelForCausalLM.from_pretrained)")
    finally:
        platform.shutdown()


DCP_DEPRECATIONS = (".*`load_state_dict` is deprecated.*", ".*Please use DTensor instead.*")
"""torch.distributed.checkpoint's FutureWarnings about the API megatron-core 0.16's dist_checkpointing calls."""


def main(argv=None) -> int:
    args, model_argv = build_parser().parse_known_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    for pattern in DCP_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    try:
        run(args, model_argv)
    except DGAError as exc:
        print(f"convert_hf_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    return 0
