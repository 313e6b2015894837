"""The README's main command (the token-limited experiment) and the fine-grained experiment, shortened:
data, clustering into a fine-domain map, importance weights and basis, real training runs, table, plots."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO as ROOT


def _experiment(tmp_path, scenario, methods, *extra):
    out = tmp_path / "exp"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "experiments.py"),
            scenario,
            "--out",
            str(out),
            "--train-iters",
            "6",
            "--methods",
            ",".join(methods),
            "--threads",
            "1",
            "--dga-interval",
            "2",
            "--save-interval",
            "100",
            *extra,
        ],  # (the default, iters // 4, would save at every one of the 6 steps)
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
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
        evals = [
            m["specific_eval_loss"]
            for m in read_metrics(out / "runs" / row["method"] / "seed1234" / "metrics.jsonl")
            if m.get("specific_eval_loss") is not None
        ]
        assert float(row["final_mean"]) == pytest.approx(evals[-1], rel=1e-5)
    for png in ("target_loss.png", "weights_importance.png", "weights_dga_ema.png", "epochs.png"):
        assert (out / png).stat().st_size > 1000, png
    assert (out / "results.md").read_text().count("| ") >= 4


@pytest.mark.slow
def test_fine_grained_distribution_reweighting_runs(tmp_path):
    # 4 x 4 x 4 = 64 fine domains of a map over the corpus's ordinary shards (one per coarse domain);
    # --log-domains-limit 16 < 64, so the per-domain lists are logged as summaries, as at K = 4,096.
    out, _ = _experiment(
        tmp_path, "fine-grained", ["dga_basis"], "--fine-clusters", "4", "4", "4", "--extra-args=--log-domains-limit 16"
    )
    from megatron_dga.data.domain_map import read_domain_map
    from megatron_dga.mixing.weights_io import load_basis, read_weights
    from megatron_dga.training.metrics import read_metrics

    prep = tmp_path / "exp" / "data" / "fine-grained" / "4x4x4_seed1234_60docs"
    dmap = read_domain_map(str(prep / "map.npz"))
    names = dmap.domain_names()
    assert dmap.levels == [4, 4, 4] and dmap.num_domains == 64
    run = out / "runs" / "dga_basis" / "seed1234"
    info = json.loads((run / "run_info.json").read_text())
    data = info["config"]["data"]
    # The trainer read the map over the coarse domains' shards, not one shard per fine domain.
    assert data["domain_map"] == str(prep / "map.npz")
    assert [os.path.basename(p) for p in data["data_path"]] == [s.name for s in dmap.shards]
    assert info["domains"] == names
    # The basis: one row per coarse domain, its documents' histogram over the fine domains. Oracle: the
    # map's own fine ids of that shard's documents, smoothed (--basis-smoothing 0.01) over the
    # non-empty fine domains only.
    basis = load_basis(prep / "basis.npz", expected_domains=names)
    assert info["basis_names"] == basis.basis_names and len(basis.basis_names) == len(dmap.shards) >= 4
    rows = basis.matrix.toarray() if hasattr(basis.matrix, "toarray") else np.asarray(basis.matrix)
    support, offsets = dmap.domain_counts() > 0, dmap.document_offsets
    for s, shard in enumerate(dmap.shards):
        counts = np.bincount(dmap.domain_ids[offsets[s] : offsets[s + 1]], minlength=64)
        expected = np.where(support, 0.99 * counts / counts.sum() + 0.01 / support.sum(), 0.0)
        np.testing.assert_allclose(
            rows[basis.basis_names.index(shard.name[: -len("_text_document")])], expected, rtol=0, atol=1e-12
        )
    iw = read_weights(prep / "fine_importance.json")
    assert iw.domains == names and iw.weights.sum() == pytest.approx(1.0) and not iw.weights[~support].any()
    # Logs: DGA over N basis weights; the K fine weights as summaries (count, mass per top-level cluster).
    metrics = read_metrics(run / "metrics.jsonl")
    assert any(m.get("dga_update") for m in metrics)
    last = [m for m in metrics if "basis_weights" in m][-1]
    assert len(last["basis_weights"]) == len(basis.basis_names) and sum(last["basis_weights"]) == pytest.approx(1.0)
    weights = last["domain_weights"]
    assert weights["summary"] is True and weights["count"] == 64 and weights["nonzero"] <= int(support.sum())
    assert list(weights["mass_by_cluster"]) == dmap.group_names(0)
    assert sum(weights["mass_by_cluster"].values()) == pytest.approx(1.0)
