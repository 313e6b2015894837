#!/usr/bin/env bash
# The main job: set up (idempotent), then the DGA demo on the embedded default corpus (text of
# this Python installation): the token-limited scenario of examples/experiments.py (uniform,
# importance sampling, DGA, DGA+EMA), a results table and PNG plots under runs/demo/token-limited/.
# One seed by default (the table says so): add --seeds 1 2 3 for spreads, paired differences and
# verdicts (3x the time). Re-running skips finished runs and resumes an interrupted one.
#   bash scripts/demo.sh [examples/experiments.py args, e.g. --train-iters 300 --methods uniform,dga_ema]
# CPU, 2 cores: about 10 minutes from a fresh clone (set-up included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "$ROOT/.venv/bin/python" examples/experiments.py token-limited --out runs/demo "$@"
