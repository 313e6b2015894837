#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite on CPU.
#   bash scripts/test.sh [pytest args...]
# GPU tests skip cleanly without a GPU. Budget: under 15 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$ROOT/.venv/bin/python" -m pytest --timeout=600 --durations=15 "$@"
