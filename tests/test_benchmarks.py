"""The benchmarks run: each prints its tables at a tiny size (they are not run by anything else in CI)."""

import re
import subprocess
import sys

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
