#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU: build the CUDA kernels for that GPU, run every GPU
# test, measure grad_dot's bandwidth, the trainer's tokens/s and its overhead, print one table.
#
#   bash scripts/gpu_check.sh --out DIR       # <= 6 min on one H100, build included
#   bash scripts/gpu_check.sh --fetch-wheels  # on a machine WITH network: put the megatron-core
#                                             # wheels (Python 3.11, 3.12) a GPU image lacks into
#                                             # .gpu_wheels/, to copy along with the repository
#
# It runs under the machine's own python3 (PYTHON=...) and its CUDA torch, needs no network and
# installs nothing system-wide: megatron-core, when that python lacks it, comes from .gpu_wheels/
# into a scratch directory (under ${TMPDIR:-/tmp}) on PYTHONPATH. transformer-engine, flash-attn and
# apex are optional: each one absent gets a "not tested here: ... (absent)" row, never a silent skip.
#   --out DIR            logs (at most 8 files, no subfolders; default ${GPU_CHECK_OUT:-gpu_check_out})
#   TORCH_CUDA_ARCH_LIST default: this GPU's compute capability only (e.g. 9.0); MAX_JOBS: nproc <= 16
#   GPU_CHECK_BUDGET_S   the whole run's time limit (default 360): each step gets a share of what is
#                        left, and a step that runs out of it is killed and named in the table
#   GPU_CHECK_TEST_WORKERS  GPU test processes at a time when pytest-xdist is installed (default 4)
# Exit: 0 all passed; 1 a step failed, timed out or was not reached; 2 no GPU (one line) or bad usage.
set -uo pipefail
START=$(date +%s)   # the budget counts from here
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_PWD="$PWD"
cd "$ROOT" || exit 1
PYTHON="${PYTHON:-python3}"
MCORE_VERSION="$(sed -n 's/^megatron-core==//p' requirements/cpu.txt)"
WHEELS="${MEGATRON_DGA_WHEELS:-$ROOT/.gpu_wheels}"
OUT="${GPU_CHECK_OUT:-$ROOT/gpu_check_out}"
FETCH=0

usage() { echo "gpu_check: $1; usage: bash scripts/gpu_check.sh [--out DIR] | --fetch-wheels" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) FETCH=1 ;;
    --out) if [ $# -lt 2 ] || [ -z "$2" ]; then usage "--out needs a directory"; fi; OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}"; [ -n "$OUT" ] || usage "--out needs a directory" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$ROOT/scripts/gpu_check.sh" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done
case "$OUT" in /*) ;; *) OUT="$CALLER_PWD/$OUT" ;; esac  # relative to where it was called from
[ -n "$MCORE_VERSION" ] || { echo "gpu_check: no 'megatron-core==VERSION' line in requirements/cpu.txt; pin it there" >&2; exit 1; }

if [ "$FETCH" = 1 ]; then
  # Wheels only (--only-binary), for x86-64 Linux whatever machine fetches them, pinned to what CI tests.
  mkdir -p "$WHEELS"
  for py in 3.12 3.11; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "megatron-core==$MCORE_VERSION" \
      || { echo "gpu_check: could not download the megatron-core $MCORE_VERSION wheel for Python $py into $WHEELS (is there network?)" >&2; exit 1; }
  done
  ls -la "$WHEELS"; exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi

BUDGET="${GPU_CHECK_BUDGET_S:-360}"
RESERVE=12   # seconds kept for a killed step's grace period and the table
DEADLINE=$(( START + BUDGET - RESERVE ))
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }
mkdir -p "$OUT" || { echo "gpu_check: cannot create the log directory $OUT" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
# The only files written there (7); earlier runs' copies go so the table never reads a stale one.
SUMMARY="$OUT/summary.md" SETUP_LOG="$OUT/setup.log" TESTS_LOG="$OUT/tests.log" TESTS_XML="$OUT/tests.xml"
GRAD_LOG="$OUT/bench_grad_dot.log" TP_LOG="$OUT/bench_train_throughput.log" OVH_LOG="$OUT/bench_trainer_overhead.log"
rm -f "$SUMMARY" "$SETUP_LOG" "$TESTS_LOG" "$TESTS_XML" "$GRAD_LOG" "$TP_LOG" "$OVH_LOG"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || { echo "gpu_check: cannot create a scratch directory under ${TMPDIR:-/tmp}" >&2; exit 1; }
trap 'rm -rf "$SCRATCH"' EXIT
STEPS="$SCRATCH/steps.tsv"
: >"$STEPS"
FAILED=0

# run_step NAME CAP LOG CMD...: CMD with stdout+stderr appended to LOG, killed (with its children)
# after CAP seconds or at the run's deadline, whichever comes first; one row per step in the table.
run_step() {
  local name="$1" cap="$2" logfile="$3" left t0 rc dt status
  shift 3
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 3 ]; then
    status="NOT RUN: the ${BUDGET} s budget (GPU_CHECK_BUDGET_S) was spent by the steps above"
  else
    [ "$cap" -gt "$left" ] && cap=$left
    log "$name (at most $cap s)"
    echo "\$ $*" >>"$logfile"
    t0=$(date +%s)
    timeout -k 5 "$cap" "$@" >>"$logfile" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case "$rc" in
      0) status="ok ($dt s)" ;;
      124|137) status="TIMED OUT: killed after $cap s, its share of the ${BUDGET} s budget (see $(basename "$logfile"))" ;;
      *) status="FAILED: exit $rc after $dt s (see $(basename "$logfile"))" ;;
    esac
  fi
  case "$status" in ok*) ;; *) FAILED=1 ;; esac
  printf '%s\t%s\n' "$name" "$status" >>"$STEPS"
  log "$name: $status"
}

# --- 0. megatron-core: the machine's, else the carried wheel (pinned to what CI tests), in scratch
if ! "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  log "megatron-core missing: installing $MCORE_VERSION from $WHEELS into $SCRATCH/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links "$WHEELS" \
      --target "$SCRATCH/site" "megatron-core==$MCORE_VERSION" >>"$SETUP_LOG" 2>&1 \
    || { echo "gpu_check: megatron-core $MCORE_VERSION is not installed and no wheel for this python in $WHEELS (run 'bash scripts/gpu_check.sh --fetch-wheels' where there is network, and copy .gpu_wheels/ along); see $SETUP_LOG" >&2; exit 1; }
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# What this machine has: versions, the GPU's arch, and the optional packages (key=value lines).
if ! "$PYTHON" - >"$SCRATCH/probe.txt" 2>>"$SETUP_LOG" <<'EOF'
import platform, torch, megatron.core as m
def probe(what):
    try:
        return what()
    except Exception as exc:  # ImportError, or a broken install that fails on import
        return "absent: " + (str(exc).splitlines() or [type(exc).__name__])[0][:90]
def te():
    import transformer_engine
    return "transformer-engine " + getattr(transformer_engine, "__version__", "?")
def flash():
    import flash_attn
    return "flash-attn " + getattr(flash_attn, "__version__", "?")
def fused_adam():
    try:
        from transformer_engine.pytorch.optimizers import FusedAdam  # noqa: F401  megatron-core's first choice
        return "transformer-engine's FusedAdam"
    except Exception:
        from apex.optimizers import FusedAdam  # noqa: F401
        return "apex's FusedAdam"
print("arch=%d.%d" % torch.cuda.get_device_capability())
print(f"versions=torch {torch.__version__} (CUDA {torch.version.cuda}) / megatron-core {m.__version__} / "
      f"{torch.cuda.get_device_name()} / Python {platform.python_version()}")
print("transformer-engine=" + probe(te))
print("flash-attn=" + probe(flash))
print("FusedAdam=" + probe(fused_adam))
EOF
then
  echo "gpu_check: $PYTHON could not report its torch/megatron-core versions; see $SETUP_LOG" >&2; exit 1
fi
cat "$SCRATCH/probe.txt" >>"$SETUP_LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$SETUP_LOG" 2>&1
log "$(sed -n 's/^versions=//p' "$SCRATCH/probe.txt")"

# --- 1. build the CUDA extension in place, for this GPU's arch only unless the caller says otherwise
ARCH="${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^arch=//p' "$SCRATCH/probe.txt")}"
JOBS="${MAX_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"; [ "$JOBS" -gt 16 ] && JOBS=16
run_step "build _C (CUDA, TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$JOBS)" 150 "$SETUP_LOG" \
  env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" "$PYTHON" setup.py build_ext --inplace
run_step "_C imports with its CUDA kernels" 30 "$SETUP_LOG" \
  "$PYTHON" -c "import sys, megatron_dga._C as C; ok = C.has_cuda(); print('has_cuda', ok); sys.exit(0 if ok else 1)"

# --- 2. every GPU-marked test (CUDA ops vs float64, TE/bf16/fp32 trainer, distributed optimizer, resume,
#        a Llama-style model on flash attention with recomputation, the --context-parallel-size refusal's reason),
#        four at a time when pytest-xdist is there (each test runs its own small trainer processes)
PYTEST_ARGS=(-m gpu -v -p no:cacheprovider "--junitxml=$TESTS_XML")
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout=140)
"$PYTHON" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n "${GPU_CHECK_TEST_WORKERS:-4}")
run_step "GPU tests" 160 "$TESTS_LOG" \
  "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" tests/ops/test_ops.py tests/training/test_checkpoint.py tests/training/test_gpu_training.py

# --- 3. grad_dot bandwidth against a device-to-device copy in the same run
run_step "benchmark grad_dot" 45 "$GRAD_LOG" \
  "$PYTHON" benchmarks/bench_grad_dot.py --device cuda --numel 100000000 --repeats 9

# --- 4. trainer tokens/s (bf16, DGA every 10 steps), a GPT of ~125M parameters; its shards in scratch
run_step "benchmark trainer tokens/s" 90 "$TP_LOG" \
  "$PYTHON" benchmarks/bench_train_throughput.py --out "$SCRATCH/throughput"

# --- 5. the trainer's own overhead per step, where this tree has that benchmark
if [ -f benchmarks/bench_trainer_overhead.py ]; then
  run_step "benchmark trainer overhead" 60 "$OVH_LOG" "$PYTHON" benchmarks/bench_trainer_overhead.py --preset gpu
else
  printf '%s\t%s\n' "benchmark trainer overhead" "not in this tree (benchmarks/bench_trainer_overhead.py)" >>"$STEPS"
fi

# --- the table (stdout and summary.md); exit 1 on any failed, timed-out or unreached step
"$PYTHON" - "$OUT" "$SCRATCH" "$(( $(date +%s) - START ))" >"$SUMMARY" <<'EOF'
import os, re, sys, xml.etree.ElementTree as ET
out, scratch, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
BAD = ("FAILED", "ERROR", "TIMED OUT", "NOT RUN")
def read(name):
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""
probe = dict(line.split("=", 1) for line in open(os.path.join(scratch, "probe.txt")).read().splitlines() if "=" in line)
steps = [line.split("\t", 1) for line in open(os.path.join(scratch, "steps.tsv")).read().splitlines() if "\t" in line]
status = dict(steps)
rows = [("versions", probe.get("versions", "?"))]
for key, what in (("transformer-engine", "the bf16 transformer-engine GPT and the Llama --use-flash-attn tests skip"),
                  ("flash-attn", "no GPU test runs its kernels"),
                  ("FusedAdam", "the optimizer is torch's AdamW (megatron-core's choice without TE/apex)")):
    value = probe.get(key, "absent: not probed")
    if value.startswith("absent"):
        name = "FusedAdam / apex" if key == "FusedAdam" else key
        rows.append((f"not tested here: {name} (absent)", f"{what} ({value[len('absent: '):]})"))
    else:
        rows.append((key, f"{value}: tested"))
rows += [(name, st) for name, st in steps if name.startswith(("build", "_C"))]
rows.append(("GPU tests", status.get("GPU tests", "NOT RUN")))
try:
    root = ET.parse(os.path.join(out, "tests.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    rows.append(("GPU tests: counts", f"{passed} passed, {n['skipped']} skipped, {n['failures']} failed, "
                                      f"{n['errors']} errors (of {n['tests']})"))
    for case in root.iter("testcase"):
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                result = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                msg = (node.get("message") or "").splitlines()[0][:70] if node.get("message") else ""
                result += f": {msg}" if msg else ""
        rows.append((f"test {case.get('name')}", f"{result} ({float(case.get('time', 0)):.1f} s)"))
except (OSError, ET.ParseError, AttributeError) as exc:
    rows.append(("GPU tests: results", f"none ({type(exc).__name__}); see tests.log"))

def bench(step, logname, parse):
    st = status.get(step, "NOT RUN")
    rows.append((step, st))
    if st.startswith("ok"):
        found = parse(read(logname))
        rows.extend(found or [(f"{step}: results", f"FAILED: no results in {logname}")])

def grad_dot(text):
    found, section = [], None
    m = re.search(r"device copy (\d+) GB/s", text)
    if m:
        found.append(("device copy", f"{m.group(1)} GB/s"))
    for line in text.splitlines():
        if line and not line.startswith(" ") and "(" in line and "B/element" in line:
            section = line.split(" (")[0]
        hit = re.match(r"\s+(fused fp64 acc|fused fp32 acc|torch\S* .*?)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+\S+\s+([\d.]+)%", line)
        if hit and section:
            found.append((f"grad_dot {section}: {hit.group(1).strip()}", f"{hit.group(3)} GB/s = {hit.group(4)}% of copy"))
    return found

def results(text):
    found = []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            key, _, value = line[len("RESULT "):].partition(": ")
            found.append((key.strip(), value.strip()))
    return found

bench("benchmark grad_dot", "bench_grad_dot.log", grad_dot)
bench("benchmark trainer tokens/s", "bench_train_throughput.log", results)
bench("benchmark trainer overhead", "bench_trainer_overhead.log", results)
rows.append(("total time", f"{seconds} s"))
width = max(len(r[0]) for r in rows)
print(f"| {'check'.ljust(width)} | result |")
print(f"|{'-' * (width + 2)}|--------|")
for k, v in rows:
    print(f"| {k.replace('|', '/').ljust(width)} | {v.replace('|', '/')} |")
bad = [k for k, v in rows if v.startswith(BAD)]
print(f"\n{'FAILED: ' + ', '.join(bad) if bad else 'all checks passed'} (logs: {out})")
sys.exit(1 if bad else 0)
EOF
TABLE_RC=$?
cat "$SUMMARY"
[ "$TABLE_RC" -eq 0 ] && [ "$FAILED" -eq 0 ] && exit 0
exit 1
