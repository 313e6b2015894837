#!/usr/bin/env python
"""Compare mixing methods over seeds: ``python examples/experiments.py --help``.

Its command line is megatron_dga/experiments/compare.py (the harness: runner, results, plots).
"""

import sys

from megatron_dga.experiments.compare import main

if __name__ == "__main__":
    sys.exit(main())
