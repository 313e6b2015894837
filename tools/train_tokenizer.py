#!/usr/bin/env python
"""Train a SentencePiece tokenizer on jsonl documents: ``python tools/train_tokenizer.py --help``.

Its command line is megatron_dga/cli/train_tokenizer.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
