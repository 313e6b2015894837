"""Train a SentencePiece tokenizer on jsonl documents, the way SentencePiece users do.

Example::

    python tools/train_tokenizer.py --input data/ more/*.jsonl.gz --model-prefix tok/spm \\
        --vocab-size 4096 --model-type unigram --seed 1234

Writes <model-prefix>.model and <model-prefix>.vocab. Special ids: unk=0, bos=1, eos=2 (the
end-of-document id the trainer and tools/preprocess_data.py --append-eod use), pad=3. The
model keeps whitespace and newlines (lossless on code).

Sentences are the non-blank lines of the documents (SentencePiece's "one sentence per line";
newlines are a piece of their own, so no piece spans two lines either way). Every input file
is read once, as a stream, with progress on stderr; a uniform, shuffled sample of
--input-sentence-size lines is kept (reservoir sampling with --seed: SentencePiece's
--input_sentence_size and --shuffle_input_sentence, made reproducible), so the time and memory
of training stay bounded whatever the corpus size; SentencePiece trains on --num-threads cores. Its own
log (loading, seed pieces, each EM round of the unigram trainer) is shown, condensed, with
the elapsed time. The same inputs, flags and seed give a byte-identical model; the model also
depends on --num-threads, so keep it fixed to reproduce one.

--sample-docs N first draws N whole documents (reservoir sampling, in memory) and trains on
their lines only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from megatron_dga.errors import ConfigError, DGAError
from megatron_dga.fileio import ensure_writable_parent
from megatron_dga.logging_setup import setup_logging
from megatron_dga.prep.inputs import expand_jsonl_inputs, sample_documents, total_bytes
from megatron_dga.prep.progress import Progress
from megatron_dga.prep.train_tokenizer import (
    InputStats,
    SentencePieceTrainConfig,
    condensed_sentencepiece_log,
    document_lines,
    stream_sentences,
    train_sentencepiece,
)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", nargs="+", required=True, help="jsonl(.gz) files, directories of them, or quoted globs"
    )
    group.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to train on (default: text)")
    group.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        help="lines SentencePiece samples (uniformly, shuffled) for training; 0: all (default: 1000000)",
    )
    group.add_argument(
        "--sample-docs",
        type=int,
        default=0,
        help="first draw this many documents and train on their lines (0: every document, the default)",
    )
    group.add_argument(
        "--max-sentence-length", type=int, default=16384, help="longest line in bytes (longer ones are cut)"
    )
    group.add_argument("--seed", type=int, default=1234, help="seed of the document and sentence sampling")
    group = parser.add_argument_group("model")
    group.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    group.add_argument("--vocab-size", type=int, default=4096)
    group.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    group.add_argument("--character-coverage", type=float, default=0.9995)
    group.add_argument(
        "--num-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="trainer threads (default: the CPU count; the model depends on it)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--log-interval", type=int, default=5000, help="documents between progress lines without a tty")
    group.add_argument("--no-progress", action="store_true", help="no progress bar and no progress log lines")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(message)s")
    try:
        ensure_writable_parent(args.model_prefix + ".model", "--model-prefix")  # before reading and training
        if args.sample_docs < 0:
            raise ConfigError(f"--sample-docs {args.sample_docs} must be >= 0 (0 keeps every document).")
        if args.log_interval < 1:
            raise ConfigError(f"--log-interval {args.log_interval} must be >= 1.")
        if any(not k.strip() for k in args.json_keys):
            raise ConfigError(f"--json-keys {args.json_keys!r}: field names must be non-empty.")
        config = SentencePieceTrainConfig(
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            max_sentence_length=args.max_sentence_length,
            character_coverage=args.character_coverage,
            num_threads=args.num_threads,
            input_sentence_size=args.input_sentence_size,
            seed=args.seed,
            minloglevel=0,
        )
        files = expand_jsonl_inputs(args.input)
        started = time.monotonic()
        stats = InputStats(started, args.input_sentence_size)
        sample = (
            f"up to {args.input_sentence_size:,} lines (a shuffled sample when there are more)"
            if args.input_sentence_size
            else "every line"
        )
        print(
            f"training a {args.model_type} SentencePiece (vocab {args.vocab_size}, {args.num_threads} threads) on "
            f"{sample} of {'every document' if not args.sample_docs else f'{args.sample_docs:,} sampled documents'} "
            f"in {len(files)} file(s)",
            file=sys.stderr,
            flush=True,
        )
        if args.sample_docs:
            texts, stats.bad = sample_documents(files, args.json_keys, args.sample_docs, args.seed)
            stats.docs = len(texts)
        try:
            with condensed_sentencepiece_log(started):
                if args.sample_docs:
                    sentences = document_lines(texts)
                else:
                    progress = Progress(
                        total_bytes(files),
                        "reading inputs",
                        unit="B",
                        enabled=False if args.no_progress else None,
                        log_every=args.log_interval,
                    )
                    sentences = stream_sentences(files, args.json_keys, stats, progress)
                try:
                    model = train_sentencepiece(sentences, config)
                finally:
                    if not args.sample_docs:
                        progress.close()
        except DGAError:
            if not stats.docs:
                raise ConfigError(
                    f"no usable document in {len(files)} input file(s) for --json-keys "
                    f"{args.json_keys} (skipped lines: {stats.bad}). Check the key names."
                ) from None
            raise
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stats.bad:
        print(f"skipped lines: {dict(sorted(stats.bad.items()))}", file=sys.stderr)
    read = f"{stats.docs:,} documents" + (f", {stats.lines:,} lines, {stats.bytes / 1e6:.1f} MB" if stats.lines else "")
    print(f"done in {time.monotonic() - started:.1f}s ({read}): {model}", file=sys.stderr)
    print(model)
    return 0
