"""Train a SentencePiece tokenizer on a deterministic sample of jsonl documents.

Example::

    python tools/train_tokenizer.py --input data/ more/*.jsonl.gz --model-prefix tok/spm \\
        --vocab-size 4096 --model-type unigram --sample-docs 20000 --seed 1234

Writes <model-prefix>.model and <model-prefix>.vocab. Special ids: unk=0, bos=1, eos=2 (the
end-of-document id the trainer and tools/preprocess_data.py --append-eod use), pad=3. The
model keeps whitespace and newlines (lossless on code). Sampling is reservoir sampling over the
documents of the sorted input files with --seed, so the same inputs, flags and seed give a
byte-identical model (the learned model also depends on --num-threads: keep it fixed).
"""

from __future__ import annotations

import argparse
import sys

from megatron_dga.prep.inputs import expand_jsonl_inputs
from megatron_dga.prep.preprocess import sample_documents
from megatron_dga.data.tokenizers import SentencePieceTrainConfig, train_sentencepiece
from megatron_dga.errors import ConfigError, DGAError
from megatron_dga.fileio import ensure_writable_parent
from megatron_dga.logging_setup import setup_logging


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="jsonl(.gz) files, directories of them, or quoted globs")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to train on (default: text)")
    group.add_argument("--sample-docs", type=int, default=100_000, help="documents sampled for training (0: all)")
    group.add_argument("--max-sentence-length", type=int, default=16384, help="longest document in bytes (longer ones are cut)")
    group.add_argument("--seed", type=int, default=1234)
    group = parser.add_argument_group("model")
    group.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    group.add_argument("--vocab-size", type=int, default=4096)
    group.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    group.add_argument("--character-coverage", type=float, default=0.9995)
    group.add_argument("--num-threads", type=int, default=1, help="trainer threads (the model depends on it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging()
    try:
        ensure_writable_parent(args.model_prefix + ".model", "--model-prefix")  # before sampling and training
        if args.sample_docs < 0:
            raise ConfigError(f"--sample-docs {args.sample_docs} must be >= 0 (0 keeps every document).")
        if any(not k.strip() for k in args.json_keys):
            raise ConfigError(f"--json-keys {args.json_keys!r}: field names must be non-empty.")
        config = SentencePieceTrainConfig(
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            max_sentence_length=args.max_sentence_length,
            character_coverage=args.character_coverage,
            num_threads=args.num_threads,
        )
        files = expand_jsonl_inputs(args.input)
        texts, bad = sample_documents(files, args.json_keys, args.sample_docs or None, args.seed)
        if not texts:
            raise ConfigError(
                f"no usable document in {len(files)} input file(s) for --json-keys "
                f"{args.json_keys} (skipped lines: {bad}). Check the key names."
            )
        if bad:
            print(f"skipped lines: {dict(sorted(bad.items()))}", file=sys.stderr)
        print(f"training {args.model_type} SentencePiece (vocab {args.vocab_size}) on {len(texts)} documents "
              f"from {len(files)} file(s)", file=sys.stderr)
        model = train_sentencepiece(texts, config)
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
