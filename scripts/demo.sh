#!/usr/bin/env bash
# The main job: set up (idempotent), then the DGA demo on the embedded default corpus.
#   bash scripts/demo.sh [examples/dga_demo.py args, e.g. --train-iters 600 --out runs/demo]
# CPU, 2 cores: about 10-15 minutes from a fresh clone (set-up included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$ROOT/.venv/bin/python" examples/dga_demo.py "$@"
