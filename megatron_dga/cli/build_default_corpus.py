"""Build the embedded default corpus, its SentencePiece tokenizer and its shards.

Example::

    python tools/build_default_corpus.py --out data/default --vocab-size 2048 --seed 1234

Everything comes from the running Python installation (see
megatron_dga/prep/default_corpus.py for the domains and the output layout). A second run with
the same flags finds the manifest, checks the file hashes and returns at once. Prints the paths
the trainer needs (--data-path prefixes, --tokenizer-model, the target set).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from megatron_dga.prep.default_corpus import CorpusConfig, prepare_default_data
from megatron_dga.errors import DGAError
from megatron_dga.fileio import ensure_writable_dir
from megatron_dga.logging_setup import setup_logging


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (new, empty, or a previous build)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-docs-per-domain", type=int, default=CorpusConfig.max_docs_per_domain)
    parser.add_argument("--target-train-docs", type=int, default=CorpusConfig.target_train_docs)
    parser.add_argument("--target-eval-docs", type=int, default=CorpusConfig.target_eval_docs)
    parser.add_argument("--json", action="store_true", help="print the resulting paths as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    setup_logging(logging.WARNING, "%(asctime)s %(levelname)s %(message)s")
    try:
        ensure_writable_dir(args.out, "--out")
        cfg = CorpusConfig(
            seed=args.seed,
            max_docs_per_domain=args.max_docs_per_domain,
            min_docs_per_domain=min(CorpusConfig.min_docs_per_domain, args.max_docs_per_domain),
            target_train_docs=args.target_train_docs,
            target_eval_docs=args.target_eval_docs,
        )
        data = prepare_default_data(
            args.out,
            vocab_size=args.vocab_size,
            seed=args.seed,
            corpus_config=cfg,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(data), indent=2))
    else:
        print(f"tokenizer:   --tokenizer-type SentencePieceTokenizer --tokenizer-model {data.tokenizer_model}")
        print(f"domains:     {' '.join(data.domain_prefixes[d] for d in data.domains)}")
        print(f"target:      {data.target_train_prefix}")
        print(f"target eval: {data.target_eval_prefix}")
    return 0
