#!/usr/bin/env python
"""Build the embedded default corpus: ``python tools/build_default_corpus.py --help``.

Its command line is megatron_dga/cli/build_default_corpus.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.build_default_corpus import main

if __name__ == "__main__":
    sys.exit(main())
