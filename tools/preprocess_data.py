#!/usr/bin/env python
"""Tokenize jsonl documents into megatron-core indexed shards: ``python tools/preprocess_data.py --help``.

Its command line is megatron_dga/cli/preprocess_data.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
