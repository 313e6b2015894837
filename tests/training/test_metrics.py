"""MetricsLogger sinks (console, TensorBoard, metrics.jsonl), resume truncation, Throughput."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest

from tests.helpers.fakes import FakeWandb
import torch

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.training.metrics import MetricsLogger, Throughput, read_metrics

DOMAINS = ["code", "web", "books"]


def _scalars(it):
    return {
        "consumed_samples": 32 * it,
        "ms_per_iter": 100.0 + it,
        "tokens_per_sec": 1000.0 * it,
        "lr": 3e-4,
        "lm_loss": 1.0 / it,
        "grad_norm": torch.tensor(0.5 * it),
        "domain_weights": np.array([0.2, 0.3, 0.5]) * 1.0,
        "domain_samples": [10 * it, 20 * it, 2 * it],
        "specific_eval_loss": 2.0 + it,
        "domain_eval_loss": [1.0, float("nan"), float("inf")],
        "mixing": "dga",
    }


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc


def test_jsonl_round_trip_and_strict_json(tmp_path):
    with MetricsLogger(tmp_path, is_writer=True, domain_names=DOMAINS, stream=io.StringIO()) as m:
        for it in (1, 2, 3):
            m.log(it, _scalars(it))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3

    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    raw = [json.loads(line, parse_constant=reject) for line in lines]
    assert raw[0]["domain_eval_loss"] == [1.0, "NaN", "Infinity"]
    records = read_metrics(tmp_path)
    for it, rec in zip((1, 2, 3), records):
        expected = _scalars(it)
        assert rec["iteration"] == it
        assert set(rec) == {"iteration", *expected}
        assert rec["lm_loss"] == pytest.approx(1.0 / it, rel=1e-15)
        assert rec["grad_norm"] == pytest.approx(0.5 * it)
        assert rec["domain_weights"] == pytest.approx([0.2, 0.3, 0.5])
        assert rec["domain_samples"] == [10 * it, 20 * it, 2 * it]
        assert rec["mixing"] == "dga"
        assert rec["domain_eval_loss"][0] == 1.0 and math.isnan(rec["domain_eval_loss"][1])
        assert rec["domain_eval_loss"][2] == math.inf


def test_tensorboard_tags_and_values(tmp_path):
    tb = tmp_path / "tb"
    with MetricsLogger(
        tmp_path, tb, domain_names=DOMAINS, stream=io.StringIO(), list_labels={"domain_alignment": ["b0", "b1"]}
    ) as m:
        for it in (1, 2):
            m.log(it, {**_scalars(it), "domain_alignment": [0.1 * it, -0.2], "mixing/custom": 7})
    acc = _events(tb)
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/lm_loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/ms_per_iter",
        "train/consumed_samples",
        "eval/specific_loss",
        "mixing/custom",
        *(f"mixing/weight/{d}" for d in DOMAINS),
        *(f"data/samples/{d}" for d in DOMAINS),
        *(f"eval/domain_loss/{d}" for d in DOMAINS),
        "mixing/alignment/b0",
        "mixing/alignment/b1",
    }
    assert expected <= tags
    assert "train/mixing" not in tags  # string values are not scalars
    loss = acc.Scalars("train/lm_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5])
    assert [e.value for e in acc.Scalars("mixing/weight/books")] == pytest.approx([0.5, 0.5])
    assert [e.value for e in acc.Scalars("data/samples/web")] == pytest.approx([20, 40])
    assert [e.value for e in acc.Scalars("mixing/alignment/b0")] == pytest.approx([0.1, 0.2])


def test_console_line_format(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, train_iters=1000, domain_names=DOMAINS, stream=stream) as m:
        line = m.log(
            100,
            {
                "consumed_samples": 3200,
                "ms_per_iter": 123.44,
                "tokens_per_sec": 12345.4,
                "lr": 3e-4,
                "lm_loss": 3.456789,
                "grad_norm": 1.2344,
                "domain_weights": [0.2, 0.3, 0.5],
                "aux_loss": 0.25,
                "skipped": 2,
            },
        )
    assert stream.getvalue() == line + "\n"
    assert re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration      100/    1000 \|", line)
    body = line[line.index("]") + 1 :]
    assert body == (
        " iteration      100/    1000 | consumed samples:         3200 |"
        " elapsed time per iteration (ms): 123.4 | tokens/s: 12345 |"
        " learning rate: 3.000000E-04 | lm loss: 3.456789E+00 | grad norm: 1.234 |"
        " aux loss: 2.500000E-01 | skipped: 2 |"
    )
    quiet = MetricsLogger(tmp_path / "q", timestamps=False, stream=stream)
    assert quiet.log(5, {"lm_loss": float("nan")}, console=False) == " iteration        5 | lm loss: NAN |"
    quiet.close()


def test_resume_truncates_crashed_entries(tmp_path):
    tb = tmp_path / "tb"
    with MetricsLogger(tmp_path, tb, stream=io.StringIO()) as m:
        for it in range(1, 11):
            m.log(it, {"lm_loss": float(it)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 11, "lm_lo')  # torn line from the crash

    # The checkpoint was at iteration 5: 6..11 are recomputed by the resumed run.
    with MetricsLogger(tmp_path, tb, start_iteration=5, stream=io.StringIO()) as m:
        for it in range(6, 9):
            m.log(it, {"lm_loss": 100.0 + it})
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert [r["lm_loss"] for r in records] == [1, 2, 3, 4, 5, 106, 107, 108]
    backup = (tmp_path / "metrics.jsonl.bak").read_text().splitlines()
    assert len(backup) == 11
    events = _events(tb).Scalars("train/lm_loss")
    assert [e.step for e in events] == list(range(1, 9))
    assert [e.value for e in events] == [1, 2, 3, 4, 5, 106, 107, 108]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "missing.jsonl")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_non_writer_is_noop(tmp_path):
    stream = io.StringIO()
    m = MetricsLogger(tmp_path / "logs", tmp_path / "tb", is_writer=False, stream=stream)
    assert m.log(1, {"lm_loss": 1.0}) is None
    m.close()
    assert stream.getvalue() == ""
    assert not (tmp_path / "logs").exists() and not (tmp_path / "tb").exists()


def test_bad_input_fails_before_writing(tmp_path):
    with MetricsLogger(tmp_path, domain_names=DOMAINS, stream=io.StringIO()) as m:
        with pytest.raises(ConfigError, match=r"'domain_weights' has 2 values but 3 labels"):
            m.log(1, {"lm_loss": 1.0, "domain_weights": [0.5, 0.5]})
        with pytest.raises(ConfigError, match="reserved"):
            m.log(1, {"iteration": 3})
        with pytest.raises(ConfigError, match="object"):
            m.log(1, {"x": object()})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    with pytest.raises(ConfigError, match="--log-interval"):
        MetricsLogger(tmp_path, log_interval=0)


def test_should_log():
    m = MetricsLogger("unused", is_writer=False, log_interval=10)
    assert [i for i in range(1, 35) if m.should_log(i)] == [10, 20, 30]


def test_throughput_window():
    times = iter([0.0, 2.0, 2.5, 5.0])
    tp = Throughput(clock=lambda: next(times))
    for _ in range(4):
        tp.step(tokens=1000, samples=2)
    w = tp.window()  # t = 2.0
    assert (w.iterations, w.tokens, w.samples, w.seconds) == (4, 4000, 8, 2.0)
    assert w.ms_per_iter == pytest.approx(500.0)
    assert w.tokens_per_sec == pytest.approx(2000.0)
    assert w.samples_per_sec == pytest.approx(4.0)
    tp.reset()  # t = 2.5, e.g. after evaluation
    tp.step(tokens=300, iterations=3)
    w = tp.window()  # t = 5.0
    assert w.seconds == pytest.approx(2.5) and w.ms_per_iter == pytest.approx(2500.0 / 3)
    assert w.tokens_per_sec == pytest.approx(120.0)
    empty = Throughput(clock=lambda: 1.0).window()
    assert math.isnan(empty.ms_per_iter) and math.isnan(empty.tokens_per_sec)


def test_fresh_run_never_overwrites_an_earlier_runs_logs(tmp_path, caplog):
    with MetricsLogger(tmp_path, stream=io.StringIO()) as m:
        for it in (1, 2, 3):
            m.log(it, {"lm_loss": float(it)})
    (tmp_path / "run_info.json").write_text('{"domains": ["a"]}\n')
    first = (tmp_path / "metrics.jsonl").read_bytes()

    # A second run in the same --log-dir without --load (start_iteration 0): the first run's files move away.
    with caplog.at_level("WARNING"), MetricsLogger(tmp_path, stream=io.StringIO()) as m:
        m.log(1, {"lm_loss": 10.0})
    kept = list((tmp_path / "previous_runs").iterdir())
    assert len(kept) == 1
    assert (kept[0] / "metrics.jsonl").read_bytes() == first
    assert (kept[0] / "run_info.json").read_text() == '{"domains": ["a"]}\n'
    assert [r["lm_loss"] for r in read_metrics(tmp_path)] == [10.0]
    assert not (tmp_path / "run_info.json").exists()
    assert "holds the metrics of an earlier run" in caplog.text and "pass --load to continue" in caplog.text

    # A third fresh run keeps the second one beside the first; a resumed run moves nothing.
    MetricsLogger(tmp_path, stream=io.StringIO()).close()
    assert len(list((tmp_path / "previous_runs").iterdir())) == 2
    with MetricsLogger(tmp_path, start_iteration=3, stream=io.StringIO()) as m:
        m.log(4, {"lm_loss": 4.0})
    assert len(list((tmp_path / "previous_runs").iterdir())) == 2


def test_full_disk_while_logging_simulated_names_the_file_and_keeps_earlier_lines(tmp_path):
    import errno

    from megatron_dga.errors import OutputError

    m = MetricsLogger(tmp_path, stream=io.StringIO())
    m.log(1, {"lm_loss": 1.0})

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real, m._file = m._file, FullDisk()
    with pytest.raises(
        OutputError,
        match=re.escape(
            f"no space left on device writing {tmp_path / 'metrics.jsonl'}; free space or point --log-dir elsewhere"
        ),
    ):
        m.log(2, {"lm_loss": 2.0})
    real.close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1]


# ----------------------------------------------------------------------------- W&B (the optional fourth sink)


def test_wandb_gets_the_tensorboard_tags_on_the_writer_only(tmp_path, monkeypatch):
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    init = {"project": "p", "name": "run", "dir": str(tmp_path / "wb")}
    with MetricsLogger(tmp_path, domain_names=DOMAINS, stream=io.StringIO(), wandb_init=init) as m:
        for it in (1, 2):
            m.log(it, _scalars(it))
        expected = [
            (it, dict(tag for key, value in _scalars(it).items() for tag in m.tags_for(key, _plain(value))))
            for it in (1, 2)
        ]
    assert fake.inits == [init] and fake.finished == 1
    np.testing.assert_equal(fake.logs, expected)  # same tags, lists one scalar per domain, step = iteration
    assert fake.logs[1][1]["mixing/weight/books"] == pytest.approx(0.5) and "train/mixing" not in fake.logs[1][1]
    MetricsLogger(tmp_path / "other", is_writer=False, wandb_init=init).close()
    assert len(fake.inits) == 1  # other ranks never start a W&B run


def _plain(value):
    from megatron_dga.training.metrics import _plain as plain

    return plain(value, "test")


def test_wandb_project_without_the_client_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    from megatron_dga.pretrain_gpt import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, find_spec finds nothing
    fix = "pip install 'megatron-dga[wandb]' (or pip install wandb), or drop --wandb-project"
    assert main(["--data-path", "a_text_document", "--wandb-project", "p"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --wandb-project p needs the W&B client") and fix in err and "\n" not in err, err
    with pytest.raises(ConfigError, match="needs the W&B client") as exc:
        MetricsLogger(tmp_path, stream=io.StringIO(), wandb_init={"project": "p"})
    assert fix in str(exc.value)


def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional W&B client (pip install 'megatron-dga[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    init = {"project": "p", "name": "offline-test", "dir": str(tmp_path / "wb"), "config": {"optimizer": {"lr": 3e-4}}}
    m = MetricsLogger(tmp_path, domain_names=DOMAINS, stream=io.StringIO(), wandb_init=init)
    for it in (1, 2, 3):
        m.log(it, _scalars(it))
    run = m._wandb
    assert (run.project, run.name, run.config["optimizer"]["lr"]) == ("p", "offline-test", 3e-4)
    assert run.summary["train/lm_loss"] == pytest.approx(0.5)  # W&B commits a step when the next one arrives
    assert run.summary["mixing/weight/books"] == pytest.approx(0.5)
    m.close()
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
