#!/usr/bin/env python
"""A run's time-averaged mixture as a weights file or schedule: ``python tools/export_mixture.py --help``.

Its command line is megatron_dga/cli/export_mixture.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.export_mixture import main

if __name__ == "__main__":
    sys.exit(main())
