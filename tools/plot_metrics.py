#!/usr/bin/env python
"""Plot weights, alignments and losses of runs: ``python tools/plot_metrics.py --help``.

Its command line is megatron_dga/cli/plot_metrics.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
