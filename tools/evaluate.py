#!/usr/bin/env python
"""Downstream accuracy of a checkpoint with lm-evaluation-harness: ``python tools/evaluate.py --help``.

Its command line is megatron_dga/cli/evaluate.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
