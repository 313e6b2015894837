"""The README's main command end to end, shortened: data, importance weights, 3 methods, table, plots."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_prints_table_and_writes_plots(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "dga_demo.py"), "--out", str(out), "--train-iters", "6",
         "--eval-interval", "3", "--dga-interval", "2", "--methods", "uniform,importance,dga_ema", "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["uniform", "importance", "dga_ema"], table
    # Numbers in the table come from the runs' metrics.jsonl, not from a file of expected values.
    from megatron_dga.training.metrics import read_metrics

    for row in table[1:]:
        name, final = row.split("|")[1].strip(), float(row.split("|")[2].strip(" *"))
        evals = [m["specific_eval_loss"] for m in read_metrics(out / "runs" / name / "metrics.jsonl")
                 if m.get("specific_eval_loss") is not None]
        assert final == pytest.approx(evals[-1], abs=1e-4)
    for png in ("target_loss.png", "weights_importance.png", "weights_dga_ema.png"):
        assert (out / png).stat().st_size > 1000, png
