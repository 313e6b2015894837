"""The benchmarks run: each prints its tables at a tiny size (nothing else in CI runs them; two had broken
after renames). Left out: bench_train_throughput (36 s at its tiny preset; scripts/gpu_check.sh runs it) and
bench_fine_domains (it builds fine-domain maps of 1,024 domains and more)."""

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


def test_dga_overhead_benchmark_prints_every_estimator_and_the_instep_agreement():
    tiny = ["--domains", "2", "--b-dom", "2", "--b-spe", "2", "--interval", "2", "--batch", "8", "--micro-batch", "2"]
    size = ["--layers", "1", "--hidden", "32", "--seq", "32", "--rounds", "1", "--instep-updates", "1"]
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_dga_overhead.py", *tiny, *size],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("exact", "fd", "instep"):
        # A measured overhead and the cost model's, in both clocks.
        assert len(re.findall(rf"^  {name} +-?[\d.]+% +[\d.]+% ", out.stdout, re.M)) == 2, out.stdout
    assert "instep / exact:" in out.stdout
    assert re.search(r"^  instep +Pearson -?[\d.]+", out.stdout, re.M), out.stdout
    assert re.search(r"^  exact, other probe samples +Pearson", out.stdout, re.M), out.stdout


@pytest.mark.parametrize(
    "script, args, expect",
    [
        (
            "bench_checkpoint_save.py",
            ["--layers", "1", "--hidden", "32", "--repeats", "1"],
            r"ours, blocking +: [\d.]+ s",
        ),
        ("bench_caps.py", ["--sizes", "4x256", "--repeat", "1"], r"4 +256 +dense +0% +\d+ +1 "),
        ("bench_grad_dot.py", ["--numel", "10000", "--tensors", "4", "--repeats", "2"], r"fused vs reference"),
        ("bench_sampler.py", ["--steps", "5", "--repeat", "1"], r"60% empty +[\d.]+ms +[\d.]+ms"),
        (
            "bench_trainer_overhead.py",
            ["--preset", "tiny", "--rounds", "1", "--window", "2", "--warmup", "1"],
            r"RESULT trainer host overhead per step \(tiny, cpu median\): -?[\d.]+ ms",
        ),
    ],
)
def test_benchmark_runs_at_a_tiny_size(script, args, expect):
    out = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(expect, out.stdout), out.stdout
