"""The README's main command (the token-limited experiment) and the fine-grained experiment, shortened:
data, clustering, importance weights and basis, real training runs, table, plots."""
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
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == methods, table
    return out / scenario, table


@pytest.mark.slow
def test_token_limited_demo_prints_table_and_writes_plots(tmp_path):
    out, table = _experiment(tmp_path, "token-limited", ["uniform", "importance", "dga_ema"])
    # Numbers in the table come from the runs' metrics.jsonl, not from a file of expected values.
    from megatron_dga.training.metrics import read_metrics

    for row in table[1:]:
        name, final = row.split("|")[1].strip(), float(row.split("|")[2].strip(" *"))
        evals = [m["specific_eval_loss"] for m in read_metrics(out / "runs" / name / "metrics.jsonl")
                 if m.get("specific_eval_loss") is not None]
        assert final == pytest.approx(evals[-1], abs=1e-4)
    for png in ("target_loss.png", "weights_importance.png", "weights_dga_ema.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "results.md").read_text().count("| ") >= 4


@pytest.mark.slow
def test_fine_grained_distribution_reweighting_runs(tmp_path):
    out, _ = _experiment(tmp_path, "fine-grained", ["dga_basis"])
    from megatron_dga.training.metrics import read_metrics

    metrics = read_metrics(out / "runs" / "dga_basis" / "metrics.jsonl")
    logged = [m for m in metrics if "basis_weights" in m]
    assert logged, "no basis weights logged"
    info = json.loads((out / "runs" / "dga_basis" / "run_info.json").read_text())
    # The coarse corpus domains form the basis; the fine weights gamma^T P run over the 4 x 3 k-means leaves.
    assert len(logged[-1]["basis_weights"]) == len(info["basis_names"]) >= 4
    assert len(logged[-1]["domain_weights"]) == len(info["domains"]) > len(info["basis_names"])
    assert abs(sum(logged[-1]["domain_weights"]) - 1.0) < 1e-9
    assert any(m.get("dga_update") for m in metrics)
