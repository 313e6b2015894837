"""Issue 11: every bad output location and every flag without effect fails in one line at start-up.

Read-only directories cannot be made here (the tests run as root, which chmod does not stop),
so an unwritable location is a path under a regular FILE (ENOTDIR, the same start-up check and
message path); a full disk is simulated by monkeypatching the write to raise ENOSPC, or torch's
errno-less "unexpected pos" failure with the free space reported as 0. Test names say which.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import traceback
import types

import pytest
import torch

from megatron_dga.errors import CheckpointError, ConfigError, DGAError
from megatron_dga.fileio import describe_os_error, ensure_writable_dir
from megatron_dga.training.arguments import parse_args

from tests.helpers import REPO as ROOT

PLAIN = ["--data-path", "x/a_text_document", "x/b_text_document"]
WEIGHTED = ["--data-path", "0.999", "x/a_text_document", "0.001", "x/b_text_document"]


def _main(argv, capsys):
    """The trainer entry point in this process: config errors return before any process group exists."""
    from megatron_dga.pretrain_gpt import main

    rc = main(argv)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- flags without effect


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--exit-interval", "4"],
            "--exit-interval 4 given without --save: the run would stop early with no checkpoint to resume from",
        ),
        (
            ["--save-interval", "5", "--keep-last", "3"],
            "--save-interval 5, --keep-last 3 given without --save: nothing is saved; add --save DIR or drop them",
        ),
        (["--ckpt-format", "torch"], "--ckpt-format torch given without --save"),
        (["--exit-signal-handler"], "--exit-signal-handler given without --save"),
        (["--exit-duration-in-mins", "30"], "--exit-duration-in-mins 30.0 given without --save"),
        (["--ckpt-step", "4"], "--ckpt-step 4 given without --load: nothing is resumed; add --load DIR"),
        (["--reset-mixing-state"], "--reset-mixing-state given without --load"),
        (["--dga-eta", "3"], "--dga-eta 3.0 given without --mixing dga: DGA is not running (--mixing not given)"),
        (
            ["--mixing", "uniform", "--dga-basis", "b.npz"],
            "--dga-basis b.npz given without --mixing dga: DGA is not running (--mixing uniform)",
        ),
        (["--mixing", "dga", "--dga-fd-step", "1e-3"], "--dga-fd-step 0.001 acts with --dga-estimator fd only"),
        (
            ["--mixing", "dga", "--dga-noise-groups", "2"],
            "--dga-noise-groups 2 acts with --dga-noise measure or shrink only",
        ),
        (
            ["--mixing", "dga", "--dga-noise", "shrink", "--dga-estimator", "fd"],
            "--dga-noise shrink needs a gradient per probe group, which --dga-estimator fd never forms",
        ),
        (
            ["--mixing", "dga", "--dga-noise", "measure", "--dga-noise-groups", "3"],
            "--dga-noise-groups 3 must be at least 2 and divide --dga-domain-batch-size 8",
        ),
        (
            ["--mixing", "dga", "--dga-instep-min-micro-batches", "2"],
            "--dga-instep-min-micro-batches 2 acts with --dga-estimator instep only",
        ),
        (
            ["--mixing", "dga", "--dga-estimator", "instep", "--dga-noise", "measure"],
            "--dga-noise measure needs a gradient per probe group, which --dga-estimator instep never forms",
        ),
        (["--mixing", "dga", "--dga-estimator", "instep", "--fp16"], "--dga-estimator instep with --fp16"),
        (
            ["--mixing", "uniform", "--importance-weights", "iw.json"],
            "--importance-weights iw.json is read by --mixing importance and by --mixing dga",
        ),
        (["--mixing", "dga", "--importance-weights", "iw.json"], "(here --mixing dga, --dga-init not given)"),
        (
            ["--mixing", "dga", "--dga-basis", "b.npz", "--dga-init", "natural"],
            "--dga-init natural weighs the K domains, but with --dga-basis",
        ),
        (
            ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
            "--dist-ckpt-optim-fully-reshardable given without --save",
        ),
        (["--save", "c", "--dist-ckpt-optim-fully-reshardable"], "--use-distributed-optimizer is not given"),
        (
            ["--save", "c", "--use-distributed-optimizer", "--distrib-optim-fully-reshardable-mem-efficient"],
            "acts with --dist-ckpt-optim-fully-reshardable only",
        ),
    ],
)
def test_flags_without_effect_are_errors_naming_them(capsys, extra, message):
    rc, err = _main(PLAIN + extra, capsys)
    assert rc == 2 and message in err and err.startswith("error: "), err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--mixing", "natural"],
            "--data-path gives weights (0.999 0.001), which --mixing natural would ignore; use --mixing static",
        ),
        (["--mixing", "uniform"], "which --mixing uniform would ignore"),
        (["--mixing", "importance", "--importance-weights", "iw.json"], "which --mixing importance would ignore"),
        (
            ["--mixing", "dga", "--dga-init", "uniform"],
            "--data-path gives weights (0.999 0.001) and --dga-init uniform also sets DGA's initial weights",
        ),
        (["--mixing", "dga", "--dga-basis", "b.npz"], "DGA weighs the basis distributions"),
    ],
)
def test_data_path_weights_are_never_silently_ignored(capsys, extra, message):
    rc, err = _main(WEIGHTED + extra, capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_a_resolved_config_validates_again():
    """dataclasses.replace re-runs the checks on a config whose defaults are filled in."""
    import dataclasses

    from megatron_dga.training.arguments import parse_args

    cfg = parse_args(PLAIN + ["--mixing", "dga", "--specific-data-path", "s"])
    fd = dataclasses.replace(cfg.mixing, dga_estimator="fd")
    assert (fd.dga_estimator, fd.dga_fd_step, fd.dga_eta) == ("fd", 1e-4, 10.0)
    assert dataclasses.replace(cfg.checkpoint).keep_last == 2


def test_data_path_weights_mean_static_or_dga_start_and_defaults_stay_concrete():
    assert parse_args(WEIGHTED).mixing.strategy == "static"  # Megatron's meaning of the weights
    dga = parse_args(WEIGHTED + ["--mixing", "dga"]).mixing
    assert (dga.strategy, dga.dga_init, dga.dga_eta, dga.dga_interval) == ("dga", "static", 10.0, 10)
    plain = parse_args(PLAIN)
    assert (plain.mixing.strategy, plain.mixing.dga_init, plain.checkpoint.keep_last, plain.checkpoint.ckpt_format) == (
        "natural",
        "uniform",
        2,
        "torch_dist",
    )
    assert parse_args(PLAIN + ["--mixing", "dga"]).mixing.dga_init == "uniform"
    saved = parse_args(PLAIN + ["--save", "c", "--keep-last", "1", "--exit-interval", "2"])
    assert (saved.checkpoint.keep_last, saved.schedule.exit_interval) == (1, 2)


# ----------------------------------------------------------------------------- output locations


def test_ensure_writable_dir_creates_probes_and_names_a_file_in_the_way(tmp_path):
    target = tmp_path / "new" / "deeper"
    assert ensure_writable_dir(target, "--save") == str(target)
    assert target.is_dir() and os.listdir(target) == []  # the probe file is gone
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(
        ConfigError,
        match=rf"^--log-dir {blocker}/logs: cannot write {blocker}/logs: {blocker} is a "
        rf"file, not a directory; point --log-dir elsewhere$",
    ):
        ensure_writable_dir(blocker / "logs", "--log-dir")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on device writing /ckpt/x.pt; free space or point --save elsewhere"),
        (errno.EDQUOT, "no space left on device writing /ckpt/x.pt; free space or point --save elsewhere"),
        (errno.EACCES, "permission denied writing /ckpt/x.pt; make it writable or point --save elsewhere"),
        (errno.EROFS, "read-only file system writing /ckpt/x.pt; point --save elsewhere"),
    ],
)
def test_os_errors_of_writes_are_one_line_naming_path_and_fix(code, words):
    assert describe_os_error(OSError(code, os.strerror(code), "/ckpt/x.pt"), "/ckpt", "--save") == words


def test_dcp_failure_is_summarised_without_its_tracebacks():
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/iter/__0_0.distcp")
    except OSError as exc:
        wrapped = CheckpointException("write", {0: (exc, traceback.extract_tb(exc.__traceback__))})
    assert "Traceback" in str(wrapped)
    assert describe_os_error(wrapped, "/ckpt/iter", "--save") == (
        "no space left on device writing /ckpt/iter/__0_0.distcp; free space or point --save elsewhere"
    )
    other = CheckpointException("write", {1: (ValueError("bad shard\nmore"), traceback.StackSummary())})
    assert describe_os_error(other, "/ckpt/iter", "--save") == "ValueError: bad shard"


def _tiny_state(value):
    return {"model": {"w": torch.full((4,), float(value))}, "iteration": value}


@pytest.mark.parametrize("failure", ["enospc_errno", "torch_unexpected_pos_with_0_bytes_free"])
def test_full_disk_during_save_simulated_is_one_line_and_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    from megatron_dga import fileio
    from megatron_dga.training import checkpoint as ckpt

    ckpt.save_checkpoint(tmp_path, 1, _tiny_state(1))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if failure == "enospc_errno":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)  # a partial file, then torch's zip writer loses the errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))  # a full disk
    with pytest.raises(CheckpointError) as exc:
        ckpt.save_checkpoint(tmp_path, 2, _tiny_state(2))
    message = str(exc.value)
    assert isinstance(exc.value, DGAError) and "\n" not in message, message  # pretrain_gpt: one line, exit 2
    assert "no space left on device writing " in message and "free space or point --save elsewhere" in message
    assert "/None" not in message
    monkeypatch.undo()
    assert ckpt.latest_iteration(tmp_path) == 1
    iteration, state, _ = ckpt.load_checkpoint(tmp_path)
    assert iteration == 1 and torch.equal(state["model"]["w"], torch.full((4,), 1.0))


def _default_ctx(rank=0, world_size=1):
    from megatron_dga.platform import ParallelContext

    return ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        dp_rank=rank,
        dp_size=world_size,
        device=torch.device("cpu"),
        backend="gloo",
    )


def test_default_log_dir_is_new_for_every_run_and_printed(tmp_path, monkeypatch, capsys):
    from megatron_dga.training.outputs import prepare_outputs

    monkeypatch.chdir(tmp_path)
    first = prepare_outputs(parse_args(PLAIN), _default_ctx())
    second = prepare_outputs(parse_args(PLAIN), _default_ctx())
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == "runs"
    assert os.path.isdir(first) and os.path.isdir(second)
    assert f"logging to {first}" in capsys.readouterr().out
    assert prepare_outputs(parse_args(PLAIN + ["--save", "ck"]), _default_ctx()) == "ck"  # --save, as before


def _outputs_on_two_ranks(rank, world_size, blocker, log_dir):
    import torch.distributed as dist

    from megatron_dga.training.outputs import prepare_outputs

    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # prepare_outputs needs the world only
    ctx = _default_ctx(rank, world_size)
    try:
        default = prepare_outputs(parse_args(PLAIN), ctx)
        try:  # only rank 0 checks --save; the logging rank 1 must get the same error
            prepare_outputs(parse_args(PLAIN + ["--save", f"{blocker}/ckpt", "--log-dir", log_dir]), ctx)
            error = None
        except ConfigError as exc:
            error = str(exc)
        return default, error
    finally:
        dist.destroy_process_group()


def test_outputs_agreed_and_errors_reach_every_rank(tmp_path, monkeypatch):
    from tests.helpers.dist_utils import run_distributed

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    results = run_distributed(_outputs_on_two_ranks, world_size=2, args=(str(blocker), str(tmp_path / "logs")))
    (dir0, err0), (dir1, err1) = results
    assert dir0 == dir1 and dir0.startswith("runs" + os.sep)  # named on the logging rank, the same everywhere
    assert (
        err0
        == err1
        == (
            f"--save {blocker}/ckpt: cannot write {blocker}/ckpt: {blocker} is a file, not a "
            f"directory; point --save elsewhere"
        )
    )


def test_unwritable_save_simulated_by_a_file_fails_before_any_data_and_keeps_old_logs(tmp_path):
    # The shards do not exist: the error below proves the check runs before any dataset is built.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text('{"iteration": 1, "lm_loss": 5.0}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_dga.pretrain_gpt",
            *PLAIN,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "100",
            "--save",
            str(blocker / "ckpt"),
            "--log-dir",
            str(logs),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"error (rank 0): --save {blocker}/ckpt: cannot write {blocker}/ckpt: {blocker} "
        f"is a file, not a directory; point --save elsewhere"
    ), proc.stderr
    # megatron-core's CPU warnings and FSDP INFO lines are filtered at start-up.
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a directory"
    assert (logs / "metrics.jsonl").read_text() == '{"iteration": 1, "lm_loss": 5.0}\n'


def test_megatron_noise_is_filtered_and_dataset_notice_said_once(caplog):
    from megatron_dga import logging_setup

    dataset_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    for f in [f for f in dataset_logger.filters if isinstance(f, logging_setup._IndexCacheNotice)]:
        dataset_logger.removeFilter(f)  # a fresh count (an earlier test may have run setup_logging)
    logging_setup.setup_logging()
    with caplog.at_level(logging.INFO):
        for _ in range(256):
            dataset_logger.warning("Unable to save GPTDataset indexes because path_to_cache is None")
        logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp").info(
            "Using Megatron-FSDP without Transformer Engine."
        )
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "megatron-core builds each domain's GPTDataset sample indices in memory (--data-cache-path "
        "DIR would cache them); said once for all domains"
    ], messages
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        logging_setup.quiet_known_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
    assert caught == []
