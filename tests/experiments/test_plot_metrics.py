"""tools/plot_metrics.py reads metrics.jsonl and TensorBoard logs alike and writes the PNGs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_dga.training.metrics import MetricsLogger, read_metrics, read_tensorboard

from tests.helpers import REPO as ROOT

NAMES = ["web", "code", "law"]


@pytest.fixture()
def run_dirs(tmp_path):
    log_dir, tb_dir = tmp_path / "run", tmp_path / "tb"
    rng = np.random.default_rng(0)
    with MetricsLogger(log_dir, tb_dir, log_interval=1, domain_names=NAMES, stream=open(os.devnull, "w")) as logger:
        for it in range(1, 6):
            w = rng.dirichlet(np.ones(3))
            logger.log(
                it,
                {
                    "lm_loss": 5.0 - 0.1 * it,
                    "domain_weights": w.tolist(),
                    "alignments": rng.normal(size=3).tolist(),
                    "specific_eval_loss": 6.0 - 0.2 * it if it % 2 == 0 else None,
                },
            )
    (log_dir / "run_info.json").write_text(json.dumps({"domains": NAMES}))
    return log_dir, tb_dir


def test_tensorboard_round_trip_matches_jsonl(run_dirs):
    log_dir, tb_dir = run_dirs
    jsonl = read_metrics(log_dir / "metrics.jsonl")
    tb = read_tensorboard(tb_dir, labels=NAMES)
    assert [m["iteration"] for m in tb] == [m["iteration"] for m in jsonl]
    for a, b in zip(jsonl, tb):
        np.testing.assert_allclose(b["domain_weights"], a["domain_weights"], rtol=1e-6)  # tensorboard stores fp32
        np.testing.assert_allclose(b["alignments"], a["alignments"], rtol=1e-6)
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6)


def test_plot_tool_writes_pngs_from_both_sources(run_dirs, tmp_path):
    log_dir, tb_dir = run_dirs
    for src in (log_dir, tb_dir):
        out = tmp_path / f"plots_{src.name}"
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), str(src), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        written = proc.stdout.split()
        assert {os.path.basename(p) for p in written} >= {f"{src.name}_weights.png", "train_loss.png"}
        assert all(os.path.getsize(p) > 1000 for p in written)


def test_plot_tool_names_a_missing_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no metrics.jsonl and no TensorBoard events" in proc.stderr


def test_runs_of_one_experiment_get_distinct_names():
    # The runner's layout <scenario>/runs/<method>/seed<seed>: every run's basename is seed1234.
    from megatron_dga.cli import plot_metrics as tool

    runs = ["out/token-limited/runs/dga_ema/seed1234", "out/token-limited/runs/uniform/seed1234/"]
    assert tool.run_names(runs) == ["dga_ema_seed1234", "uniform_seed1234"]
    assert tool.run_names(["logs/a", "logs/b"]) == ["a", "b"]
    with pytest.raises(Exception, match="more than once"):
        tool.run_names(["logs/a", "logs/a/"])
