#!/usr/bin/env python
"""k-means domains: jsonl files per domain, or a fine-domain map over shards: ``python tools/cluster_domains.py --help``.

Its command line is megatron_dga/cli/cluster_domains.py (a module, so the runner and the tests call it in-process).
"""

import sys

from megatron_dga.cli.cluster_domains import main

if __name__ == "__main__":
    sys.exit(main())
