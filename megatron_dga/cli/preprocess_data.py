"""Tokenize jsonl documents into megatron-core indexed shards (Megatron's CLI conventions).

Examples::

    # one shard: out/web_text_document.{bin,idx,json}
    python tools/preprocess_data.py --input web.jsonl.gz --output-prefix out/web \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod

    # a directory of per-domain files -> one shard per domain, named by the file stem:
    # data/code.jsonl, data/law.jsonl.gz -> shards/code_text_document.*, shards/law_text_document.*
    python tools/preprocess_data.py --input data/ --output-prefix shards \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 2

--input also takes a quoted glob ('parts/*.jsonl'): the matching files go, in sorted order,
into one shard. Bad lines are skipped and reported per reason at the end; see
megatron_dga/prep/preprocess.py for the sidecar .json fields and the atomic-write protocol.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from megatron_dga.prep.preprocess import PreprocessConfig, format_report, preprocess
from megatron_dga.data.tokenizers import TOKENIZER_TYPES, TokenizerSpec
from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input", required=True, help="jsonl(.gz) file, quoted glob, or directory of per-domain jsonl files"
    )
    group.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to tokenize (default: text)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, help="SentencePiece .model file or HuggingFace directory")
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output prefix (a directory in directory mode)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between log lines without a tty")
    group.add_argument("--no-progress", action="store_true", help="no progress bar and no progress log lines")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(levelname)s %(message)s")
    # SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C: the temp files are removed on the way out.
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal.signal works
    previous_sigterm = (
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)) if in_main_thread else None
    )
    try:
        config = PreprocessConfig(
            input=args.input,
            output_prefix=args.output_prefix,
            tokenizer=TokenizerSpec(
                args.tokenizer_type,
                tokenizer_model=args.tokenizer_model,
                vocab_file=args.vocab_file,
                merge_file=args.merge_file,
                vocab_size=args.vocab_size,
            ),
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            progress=False if args.no_progress else None,
        )
        results = preprocess(config)
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: temporary files removed, previous outputs untouched", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM
        print("terminated: temporary files removed, previous outputs untouched", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    print(format_report(results))
    return 0
