#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the CUDA kernels, run every GPU test,
# measure grad_dot's bandwidth and the trainer's tokens/s, print one summary table.
#
#   bash scripts/gpu_check.sh                 # ~5-8 min on one H100/H200
#   bash scripts/gpu_check.sh --fetch-wheels  # on a machine WITH network: put the megatron-core
#                                             # wheel a GPU image lacks into .gpu_wheels/ to carry
#
# It runs under the machine's own python3 (PYTHON=...) and its CUDA torch; it installs nothing
# system-wide. megatron-core, when that python lacks it, comes from .gpu_wheels/ (no network
# needed) into a private directory on PYTHONPATH. Without a GPU it exits 2 with one line.
# Output: the table on stdout; full logs under ${GPU_CHECK_OUT:-gpu_check_out}/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
MCORE_VERSION="$(sed -n 's/^megatron-core==//p' requirements/cpu.txt)"
WHEELS="${MEGATRON_DGA_WHEELS:-$ROOT/.gpu_wheels}"

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  for py in 3.11 3.12; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
      -d "$WHEELS" "megatron-core==$MCORE_VERSION" || exit 1
  done
  ls -la "$WHEELS"; exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi

OUT="${GPU_CHECK_OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }

# --- megatron-core: the machine's, else the carried wheel (pinned to what CI tests)
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  SITE="$OUT/site"
  log "megatron-core missing: installing $MCORE_VERSION from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --target "$SITE" \
      "megatron-core==$MCORE_VERSION" >"$OUT/pip.log" 2>&1 \
    || { echo "gpu_check: megatron-core $MCORE_VERSION is not installed and no wheel in $WHEELS (run 'bash scripts/gpu_check.sh --fetch-wheels' where there is network, and carry .gpu_wheels); see $OUT/pip.log" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import megatron.core as m, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| megatron-core', m.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/versions.txt" >&2

# --- 1. build the CUDA extension in place (sm_90 + PTX; sm_80 too for A100s)
log "building megatron_dga._C with CUDA"
BUILD_T0=$(date +%s)
if FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
    && "$PYTHON" -c "import megatron_dga._C as C, sys; sys.exit(0 if C.has_cuda() else 1)"; then
  BUILD="ok ($(( $(date +%s) - BUILD_T0 )) s)"
else
  BUILD="FAILED (see $OUT/build.log)"
fi
log "build: $BUILD"

# --- 2. every GPU-marked test (CUDA ops vs float64, TE/bf16/fp32 trainer, distributed optimizer, resume,
#        a Llama-style model on flash attention with recomputation, the --context-parallel-size refusal's reason)
log "GPU tests"
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --timeout=600 --junitxml="$OUT/gpu_tests.xml" \
    tests/test_ops.py tests/test_checkpoint.py tests/test_gpu_training.py >"$OUT/gpu_tests.log" 2>&1
log "$(tail -1 "$OUT/gpu_tests.log")"

# --- 3. grad_dot bandwidth against a device-to-device copy in the same run
log "grad_dot benchmark"
"$PYTHON" benchmarks/bench_grad_dot.py --device cuda --numel 100000000 --repeats 9 >"$OUT/bench_grad_dot.log" 2>&1

# --- 4. trainer tokens/s (bf16, DGA every 10 steps), a GPT of ~125M parameters
log "trainer throughput"
"$PYTHON" benchmarks/bench_train_throughput.py --out "$OUT/throughput" >"$OUT/throughput.log" 2>&1

# --- the table
"$PYTHON" - "$OUT" "$BUILD" "$(( $(date +%s) - START ))" <<'EOF'
import os, re, sys, xml.etree.ElementTree as ET
out, build, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [("versions", open(os.path.join(out, "versions.txt")).read().strip()), ("build _C (CUDA)", build)]
try:
    cases = ET.parse(os.path.join(out, "gpu_tests.xml")).getroot().iter("testcase")
    for case in cases:
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                msg = (node.get("message") or "").splitlines()[0][:70] if node.get("message") else ""
                status += f": {msg}" if msg else ""
        rows.append((f"test {case.get('name')}", f"{status} ({float(case.get('time', 0)):.1f} s)"))
except (OSError, ET.ParseError) as exc:
    rows.append(("GPU tests", f"no results ({exc}); see gpu_tests.log"))
bench = open(os.path.join(out, "bench_grad_dot.log")).read() if os.path.exists(os.path.join(out, "bench_grad_dot.log")) else ""
m = re.search(r"device copy (\d+) GB/s", bench)
rows.append(("device copy", f"{m.group(1)} GB/s" if m else "n/a (see bench_grad_dot.log)"))
section = None
for line in bench.splitlines():
    if line and not line.startswith(" ") and "(" in line and "B/element" in line:
        section = line.split(" (")[0]
    hit = re.match(r"\s+(fused fp64 acc|fused fp32 acc|torch\S* .*?)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+\S+\s+([\d.]+)%", line)
    if hit and section:
        rows.append((f"grad_dot {section}: {hit.group(1).strip()}", f"{hit.group(3)} GB/s = {hit.group(4)}% of copy"))
tp = open(os.path.join(out, "throughput.log")).read() if os.path.exists(os.path.join(out, "throughput.log")) else ""
for line in tp.splitlines():
    if line.startswith("RESULT "):
        key, _, value = line[len("RESULT "):].partition(": ")
        rows.append((key, value))
if not any(r[0].startswith("tokens/s") for r in rows):
    rows.append(("tokens/s", "n/a (see throughput.log)"))
rows.append(("total time", f"{seconds} s"))
width = max(len(r[0]) for r in rows)
print(f"| {'check'.ljust(width)} | result |")
print(f"|{'-' * (width + 2)}|--------|")
for k, v in rows:
    print(f"| {k.ljust(width)} | {v.replace('|', '/')} |")
failed = [k for k, v in rows if "FAILED" in v or "ERROR" in v]
sys.exit(1 if failed else 0)
EOF
