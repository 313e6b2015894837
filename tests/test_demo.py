"""The README's main command (the token-limited experiment) and the fine-grained experiment, shortened:
data, clustering, importance weights and basis, real training runs, table, plots."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(tmp_path, scenario, methods):
    out = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "experiments.py"), scenario, "--out", str(out),
         "--train-iters", "6", "--methods", ",".join(methods), "--threads", "1", "--fine-clusters", "4", "3",
         "--dga-interval", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "One seed" in proc.stdout  # the demo says what one seed can and cannot show
    with open(out / scenario / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["method"] for row in rows] == methods, rows
    return out / scenario, rows


@pytest.mark.slow
def test_token_limited_demo_prints_table_and_writes_plots(tmp_path):
    out, rows = _experiment(tmp_path, "token-limited", ["uniform", "importance", "dga_ema"])
    # Numbers in the table come from the runs' metrics.jsonl, not from a file of expected values.
    from megatron_dga.training.metrics import read_metrics

    for row in rows:
        evals = [m["specific_eval_loss"] for m in read_metrics(out / "runs" / row["method"] / "seed1234" / "metrics.jsonl")
                 if m.get("specific_eval_loss") is not None]
        assert float(row["final_mean"]) == pytest.approx(evals[-1], rel=1e-5)
    for png in ("target_loss.png", "weights_importance.png", "weights_dga_ema.png", "epochs.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "results.md").read_text().count("| ") >= 4


@pytest.mark.slow
def test_fine_grained_distribution_reweighting_runs(tmp_path):
    out, _ = _experiment(tmp_path, "fine-grained", ["dga_basis"])
    from megatron_dga.training.metrics import read_metrics

    metrics = read_metrics(out / "runs" / "dga_basis" / "seed1234" / "metrics.jsonl")
    logged = [m for m in metrics if "basis_weights" in m]
    assert logged, "no basis weights logged"
    info = json.loads((out / "runs" / "dga_basis" / "seed1234" / "run_info.json").read_text())
    # The coarse corpus domains form the basis; the fine weights gamma^T P run over the 4 x 3 k-means leaves.
    assert len(logged[-1]["basis_weights"]) == len(info["basis_names"]) >= 4
    assert len(logged[-1]["domain_weights"]) == len(info["domains"]) > len(info["basis_names"])
    assert abs(sum(logged[-1]["domain_weights"]) - 1.0) < 1e-9
    assert any(m.get("dga_update") for m in metrics)
