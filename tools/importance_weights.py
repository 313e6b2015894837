#!/usr/bin/env python
"""Importance weights and the basis matrix of distribution reweighting: ``python tools/importance_weights.py --help``.

Its command line is megatron_dga/cli/importance_weights.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.importance_weights import main

if __name__ == "__main__":
    sys.exit(main())
