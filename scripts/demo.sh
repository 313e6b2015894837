#!/usr/bin/env bash
# The main job: set up (idempotent), then the DGA demo on the embedded default corpus:
# the token-limited scenario of examples/experiments.py (uniform, importance sampling, DGA,
# DGA+EMA), a results table and PNG plots under runs/demo/.
#   bash scripts/demo.sh [examples/experiments.py args, e.g. --train-iters 300 --methods uniform,dga_ema]
# CPU, 2 cores: about 10 minutes from a fresh clone (set-up included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$ROOT/.venv/bin/python" examples/experiments.py token-limited --out runs/demo "$@"
