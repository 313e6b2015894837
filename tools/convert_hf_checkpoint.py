#!/usr/bin/env python
"""Hugging Face <-> megatron-dga checkpoints: ``python tools/convert_hf_checkpoint.py --help``.

Its command line is megatron_dga/cli/convert_hf_checkpoint.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.convert_hf_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
