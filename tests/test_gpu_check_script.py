"""scripts/gpu_check.sh without a GPU: its refusal, and its bookkeeping on a stand-in GPU machine
(an ``nvidia-smi`` that answers and a python whose torch says CUDA is there, while the build, pytest
and the benchmarks are faked): the rows for absent optional packages, the log directory's file
limit, the RESULT rows, and the time budget naming the step that ran out of it."""

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO as ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a bash script for Linux GPU machines")

FAKE_TORCH = """\
from types import SimpleNamespace
__version__ = "2.11.0+fake"
version = SimpleNamespace(cuda="13.0")
cuda = SimpleNamespace(is_available=lambda: True, get_device_capability=lambda: (9, 0),
                       get_device_name=lambda: "Fake H100")
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="1" tests="3" time="1.0"><testcase classname="tests.ops.test_ops" name="test_a" time="0.1"/>
<testcase classname="tests.ops.test_ops" name="test_b" time="0.2"/><testcase classname="tests.training.test_gpu_training"
name="test_te" time="0.0"><skipped message="could not import 'transformer_engine'"/></testcase></testsuite></testsuites>
"""

# Everything the script runs through $PYTHON: the build, pytest and the benchmarks are faked by
# name; any other python code (the probes, the table) runs for real over the fake torch above.
FAKE_PYTHON = """\
#!/usr/bin/env bash
case "$1" in
  setup.py) echo "fake build for $TORCH_CUDA_ARCH_LIST"; [ -n "${FAKE_BUILD_SLEEP:-}" ] && exec sleep "$FAKE_BUILD_SLEEP"; exit 0 ;;
  benchmarks/bench_grad_dot.py) printf 'HBM: theoretical peak 3350 GB/s | device copy 3000 GB/s\\n'; exit 0 ;;
  benchmarks/bench_train_throughput.py)
    mkdir -p "$3" && for i in 1 2 3 4 5; do echo x >"$3/shard$i"; done  # its --out: shards, run logs
    echo "RESULT tokens/s static mixing (fake): 123,456"; exit 0 ;;
  benchmarks/bench_trainer_overhead.py) echo "RESULT trainer overhead per step (fake): 1.5 ms"; exit 0 ;;
esac
if [ "$1 $2" = "-m pytest" ]; then
  for a in "$@"; do case "$a" in --junitxml=*) cp "{fake}/junit.xml" "${{a#--junitxml=}}" ;; esac; done
  echo "2 passed, 1 skipped"; exit 0
fi
case "$*" in *has_cuda*) exit 0 ;; esac
PYTHONPATH="{fake}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{python}" "$@"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_gpu(tmp_path):
    """(env, out dir): a PATH with an nvidia-smi and a PYTHON standing in for a GPU machine's."""
    fake = tmp_path / "fake"
    (fake / "megatron" / "core").mkdir(parents=True)
    (fake / "torch").mkdir()
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (fake / "megatron" / "__init__.py").write_text("")
    (fake / "megatron" / "core" / "__init__.py").write_text('__version__ = "0.16.1"\n')
    for absent in ("transformer_engine", "flash_attn", "apex"):
        (fake / absent).mkdir()
        (fake / absent / "__init__.py").write_text(f'raise ImportError("No module named {absent!r}")\n')
    (fake / "junit.xml").write_text(JUNIT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", "#!/bin/sh\necho 'Fake H100, 580.00, 81559 MiB'\n")
    _executable(
        bin_dir / "python",
        FAKE_PYTHON.replace("{fake}", str(fake))
        .replace("{python}", sys.executable)
        .replace("{{", "{")
        .replace("}}", "}"),
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=str(bin_dir / "python"),
        TMPDIR=str(tmp_path),
        PYTHONPATH="",
    )
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    for var in ("GPU_CHECK_OUT", "MAX_JOBS", "GPU_CHECK_BUDGET_S"):
        env.pop(var, None)
    return env, tmp_path / "logs"


def _run(env, *args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 0\n")  # the driver is there, torch sees no GPU
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        GPU_CHECK_OUT=str(tmp_path / "logs"),
    )
    proc = _run(env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA GPU visible to {sys.executable} (torch.cuda.is_available() is False); "
        "run it on a GPU machine"
    ]
    assert proc.stdout == "" and not (tmp_path / "logs").exists()


def test_table_rows_and_at_most_8_log_files(fake_gpu):
    env, out = fake_gpu
    proc = _run(env, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for row in (
        "| not tested here: transformer-engine (absent) ",
        "| not tested here: flash-attn (absent) ",
        "| not tested here: FusedAdam / apex (absent) ",
    ):
        assert row in table, table
    jobs = min(16, len(os.sched_getaffinity(0)))
    assert f"| build _C (CUDA, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS={jobs}) | ok " in table  # this GPU's arch only
    assert "2 passed, 1 skipped, 0 failed, 0 errors (of 3)" in table
    assert "skipped: could not import 'transformer_engine'" in table
    assert "| device copy " in table and "3000 GB/s" in table
    assert "123,456" in table
    if os.path.exists(os.path.join(ROOT, "benchmarks", "bench_trainer_overhead.py")):
        assert "| trainer overhead per step (fake) " in table and "1.5 ms" in table
    assert table.rstrip().endswith(f"all checks passed (logs: {out})")
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(os.path.dirname(f) == str(out) for f in files), files
    assert open(out / "summary.md").read() == table
    # the scratch directory (megatron-core's site, the benchmark's shards) is gone
    assert not [p for p in os.listdir(env["TMPDIR"]) if p.startswith("gpu_check.")]


def test_a_step_over_the_budget_is_killed_named_and_fails_the_run(fake_gpu):
    env, out = fake_gpu
    env.update(GPU_CHECK_BUDGET_S="17", FAKE_BUILD_SLEEP="60", TORCH_CUDA_ARCH_LIST="8.0", MAX_JOBS="3")
    proc = _run(env, "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in proc.stdout.splitlines()
        if line.startswith("| ")
    }
    build = "build _C (CUDA, TORCH_CUDA_ARCH_LIST=8.0, MAX_JOBS=3)"  # the caller's arch list and jobs
    assert rows[build].startswith("TIMED OUT: killed after"), rows
    assert rows["GPU tests"].startswith("NOT RUN: the 17 s budget"), rows
    assert rows["benchmark grad_dot"].startswith("NOT RUN"), rows
    assert int(rows["total time"].split()[0]) <= 17
