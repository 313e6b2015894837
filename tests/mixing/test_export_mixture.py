"""tools/export_mixture.py: a DGA run's time-averaged mixture, exported and trained on with --mixing static,
checked against a float64 recomputation from metrics.jsonl and bit for bit against the static run's log."""

import json
import os

import numpy as np
import pytest

from megatron_dga.errors import DataError
from megatron_dga.mixing import export
from megatron_dga.mixing.weights_io import read_weights
from tests.helpers.dist_utils import run_distributed
from tests.helpers.synthetic import TINY_GPT_ARGS, data_flags, run_argv, three_domain_shards

from tests.helpers import REPO as ROOT
from megatron_dga.cli import export_mixture


def _args(shards, log_dir, iters, extra=()):
    return run_argv(log_dir, extra, data=data_flags(shards), iters=iters)


def _source_then_static(rank, world_size, shards, tmp):
    """The DGA source run, the export (data-path and weights), then a static run and a DGA run started from them."""
    from megatron_dga.pretrain_gpt import main

    src = os.path.join(tmp, "dga")
    assert (
        main(
            _args(
                shards,
                src,
                6,
                [
                    "--mixing",
                    "dga",
                    "--dga-interval",
                    "3",
                    "--dga-eta",
                    "30",
                    "--dga-ema",
                    "1.0",
                    "--dga-specific-batch-size",
                    "8",
                    "--save",
                    os.path.join(src, "ckpt"),
                    "--save-interval",
                    "4",
                ],
            )
        )
        == 0
    )
    # The Hugging Face export of the iteration-4 checkpoint (one plain process, as the tool runs)
    import runpy

    torchrun = {
        key: os.environ.pop(key)
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        if key in os.environ
    }
    convert = runpy.run_path(os.path.join(ROOT, "tools", "convert_hf_checkpoint.py"))["main"]
    assert (
        convert(
            [
                "to-hf",
                "--load",
                os.path.join(src, "ckpt"),
                "--ckpt-step",
                "4",
                "--output",
                os.path.join(tmp, "hf"),
                *TINY_GPT_ARGS,
            ]
        )
        == 0
    )
    os.environ.update(torchrun)
    for fmt in ("data-path", "weights"):
        assert export_mixture.main([src, "--format", fmt, "--output", os.path.join(tmp, f"mix.{fmt}")]) == 0
    # --data-args-path holds the --data-path value: the weighted prefixes (plain ones replaced)
    assert (
        main(
            _args(shards, os.path.join(tmp, "static"), 3, ["--mixing", "static"])[1 + len(shards["domains"]) :]
            + ["--data-args-path", os.path.join(tmp, "mix.data-path")]
        )
        == 0
    )
    assert (
        main(
            _args(
                shards,
                os.path.join(tmp, "init"),
                2,
                ["--mixing", "dga", "--dga-interval", "100", "--dga-init", os.path.join(tmp, "mix.weights")],
            )
        )
        == 0
    )
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shards = three_domain_shards(str(tmp_path_factory.mktemp("shards")))
    tmp = str(tmp_path_factory.mktemp("runs"))
    run_distributed(_source_then_static, world_size=1, args=(shards, tmp))
    return tmp


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _oracle(metrics, k, start=0):
    """float64, step by step: step t draws from the weights logged at t - 1 (uniform before the first
    line: --dga-init uniform), weighted by the samples it drew (this test logs every step)."""
    prev = np.full(k, 1.0 / k)
    num, den = np.zeros(k), 0.0
    for m in metrics:
        n = float(np.sum(m["domain_samples"], dtype=np.float64))
        if m["iteration"] > start:
            num += n * prev
            den += n
        prev = np.asarray(m["domain_weights"], dtype=np.float64)
    return num / den


def test_static_run_reproduces_the_exported_time_average_exactly(runs):
    src = _read(os.path.join(runs, "dga", "metrics.jsonl"))
    oracle = _oracle(src, 3)
    # DGA moved the weights (the average is not uniform, not the final weights)
    assert np.abs(oracle - 1 / 3).max() > 1e-3 and np.abs(oracle - src[-1]["domain_weights"]).max() > 1e-4
    tokens = open(os.path.join(runs, "mix.data-path")).read().split()
    exported = [float(w) for w in tokens[0::2]]
    assert [os.path.basename(p) for p in tokens[1::2]] == [
        "dom0_text_document",
        "dom1_text_document",
        "dom2_text_document",
    ]
    np.testing.assert_allclose(exported, oracle, rtol=0, atol=1e-15)
    static = _read(os.path.join(runs, "static", "metrics.jsonl"))
    assert len(static) == 3
    for m in static:
        assert m["domain_weights"] == exported  # bit for bit: the consumer keeps the exported vector
    wf = read_weights(os.path.join(runs, "mix.weights"))
    assert wf.domains == ["dom0", "dom1", "dom2"] and wf.meta["statistic"] == "time-average"
    assert wf.meta["window"] == [0, 6] and wf.meta["raw_weights"] == pytest.approx(oracle, abs=1e-15)
    np.testing.assert_allclose(wf.weights, oracle, rtol=0, atol=1e-15)
    for m in _read(os.path.join(runs, "init", "metrics.jsonl")):  # --dga-init FILE, no update in 2 steps
        assert m["domain_weights"] == wf.weights.tolist()


def _thinned(runs, tmp_path, keep):
    """The source run's log with only the lines at ``keep`` (as if logged with a longer --log-interval)."""
    out = tmp_path / f"thin{'_'.join(map(str, keep))}"
    out.mkdir()
    lines = [line for line in open(os.path.join(runs, "dga", "metrics.jsonl")) if json.loads(line)["iteration"] in keep]
    (out / "metrics.jsonl").write_text("".join(lines))
    (out / "run_info.json").write_text(open(os.path.join(runs, "dga", "run_info.json")).read())
    return str(out)


def test_windows_pieces_and_what_the_log_cannot_tell(runs, tmp_path):
    src = _read(os.path.join(runs, "dga", "metrics.jsonl"))
    hist = export.history(export.read_run(os.path.join(runs, "dga")))
    np.testing.assert_allclose(hist.time_average(2, 6), _oracle(src, 3, start=2), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(hist.final(), src[-1]["domain_weights"])
    # Logged at 2, 4, 6 with updates after steps 3 and 6: steps 1-3 draw from the initial (uniform) weights,
    # 4 from those logged at 4 (the update after step 3, none after 4), 5-6 likewise.
    thin = export.history(export.read_run(_thinned(runs, tmp_path, (2, 4, 6))))
    pieces = [(a, b) for a, b, _, _ in thin.segments()]
    assert pieces == [(0, 2), (2, 3), (3, 4), (4, 6)]
    np.testing.assert_allclose(thin.time_average(), _oracle(src, 3), rtol=0, atol=1e-15)
    # Logged at 6 only: steps 4-6 drew from weights no line shows.
    with pytest.raises(DataError, match=r"steps 4..6 are not in metrics.jsonl.*--dga-interval 3.*--log-interval"):
        export.history(export.read_run(_thinned(runs, tmp_path, (6,)))).time_average()
    # The schedule file: the pieces and their weights, as written
    out = tmp_path / "schedule.json"
    assert export_mixture.main([os.path.join(runs, "dga"), "--format", "schedule", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == export.SCHEDULE_FORMAT and doc["domains"] == ["dom0", "dom1", "dom2"]
    assert [(s["start_iteration"], s["end_iteration"]) for s in doc["segments"]] == [(i, i + 1) for i in range(6)]
    assert doc["segments"][4]["weights"] == src[3]["domain_weights"]


def test_hugging_face_export_carries_the_mixture_history(runs):
    """to-hf of the iteration-4 checkpoint writes mixture_history.json beside config.json: the weights logged
    up to iteration 4 and the tokens drawn per domain by then, from the run's metrics.jsonl."""
    src = _read(os.path.join(runs, "dga", "metrics.jsonl"))[:4]
    hf = os.path.join(runs, "hf")
    assert os.path.isfile(os.path.join(hf, "config.json"))
    doc = json.load(open(os.path.join(hf, export.HISTORY_FILENAME)))
    assert doc["format"] == export.HISTORY_FORMAT and doc["checkpoint_iteration"] == 4
    assert doc["domains"] == ["dom0", "dom1", "dom2"] and doc["iterations"] == [1, 2, 3, 4]
    assert doc["domain_weights"] == [m["domain_weights"] for m in src]
    assert doc["consumed_tokens"] == [m["consumed_tokens"] for m in src] == [256, 512, 768, 1024]
    assert doc["tokens_per_domain"] == (np.sum([m["domain_samples"] for m in src], axis=0) * 32).tolist()
    assert sum(doc["tokens_per_domain"]) == 1024
    np.testing.assert_allclose(doc["time_averaged_weights"], _oracle(src, 3), rtol=0, atol=1e-15)


def test_export_errors_name_the_flag_and_the_fix(runs, tmp_path, capsys):
    src = os.path.join(runs, "dga")
    assert export_mixture.main([src, "--window", "4:9", "--output", str(tmp_path / "w.json")]) == 2
    assert "--window 4:9: need 0 <= START < END <= 6" in capsys.readouterr().err
    assert export_mixture.main([src, "--space", "basis", "--output", str(tmp_path / "w.json")]) == 2
    assert "no --dga-basis" in capsys.readouterr().err
    assert export_mixture.main([str(tmp_path), "--output", str(tmp_path / "w.json")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert export_mixture.main([src, "--output", str(tmp_path / "no" / "w.json")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err


def test_exact_simplex_is_a_fixed_point_of_each_consumer():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5, 7, 10):
        for _ in range(40):
            x = rng.random(k) ** 3
            for fmt, consume in (("weights", export._sampler_normalise), ("data-path", export._data_path_normalise)):
                w = export.exact_simplex(x, fmt)
                np.testing.assert_array_equal(consume(w), w)
                np.testing.assert_allclose(w, x / x.sum(), rtol=0, atol=1e-15)
