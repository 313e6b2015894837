#!/usr/bin/env bash
# Idempotent project setup: .venv with the pinned CPU set, then the csrc extension.
#
#   source scripts/setup_env.sh      # or: bash scripts/setup_env.sh
#
# Re-running is cheap: the venv is rebuilt only when requirements/cpu.txt changes,
# the extension only when csrc/ or setup.py changes.
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
#              VENV (default <repo>/.venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

log() { echo "[setup] $*" >&2; }

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# pip, minus the per-package notes some machines' index configuration prints; errors still show.
pip_quiet() {
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$py_version" in
  3.10|3.11|3.12) ;;
  *) log "error: $PYTHON is Python $py_version; megatron-dga's pinned set needs Python 3.10-3.12 (set PYTHON=python3.11)"; exit 2 ;;
esac

req_hash=$(hash_of "$ROOT/requirements/cpu.txt")
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.req-hash" 2>/dev/null)" != "$req_hash" ]; then
  log "creating $VENV with $PYTHON ($py_version) and the pinned CPU set (about a minute)"
  "$PYTHON" -m venv "$VENV"
  pip_quiet install -q --upgrade pip >/dev/null
  pip_quiet install -q -r "$ROOT/requirements/cpu.txt"
  echo "$req_hash" > "$VENV/.req-hash"
else
  log "$VENV is up to date"
fi

ext_hash=$(hash_of "$ROOT/setup.py" $(find "$ROOT/csrc" -type f | sort))
if [ "$(cat "$VENV/.ext-hash" 2>/dev/null)" != "$ext_hash" ] || ! "$VENV/bin/python" -c "import megatron_dga._C" >/dev/null 2>&1; then
  log "building the csrc extension megatron_dga._C (C++/OpenMP; CUDA too when a toolkit and a CUDA torch are present)"
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" pip_quiet install -q --no-build-isolation --no-deps -e . )
  "$VENV/bin/python" -c "import megatron_dga._C" || { log "error: the extension built but does not import"; exit 1; }
  echo "$ext_hash" > "$VENV/.ext-hash"
else
  log "extension megatron_dga._C is up to date"
fi

# When sourced, leave the venv active for the caller.
if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
