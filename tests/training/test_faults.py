"""Runs that meet each other, signals and interrupts (issue 22, classes 4 and 5).

- One writer per --save: a second run saving into a directory a live run holds is refused at start-up
  naming the holder; a lock left by a dead run is taken over (training/save_lock.py).
- A checkpoint removed while it is read (the --keep-last rotation of the run saving there) is one
  CheckpointError naming it and the fix, from every reader entry point (checkpoint.reading).
- Ctrl-C without --exit-signal-handler: one line and exit code 130, no traceback; a Ctrl-C while a
  checkpoint save forks its writers is raised once the save is complete, not lost.
- SIGTERM to examples/pretrain_gpt_dga.sh (torchrun, 2 CPU ranks, --exit-signal-handler): both ranks
  save and the script exits 0.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_dga.errors import CheckpointError, ConfigError
from megatron_dga.training import checkpoint as ckpt
from megatron_dga.training import save_lock
from tests.helpers.dist_utils import free_port
from tests.helpers import REPO
from tests.helpers.synthetic import NULL_TOKENIZER_ARGS, TINY_GPT_ARGS, data_flags, run_argv

ROOT = Path(REPO)


def _argv(shards, run_dir, extra=(), iters=500):
    return run_argv(run_dir, extra, data=data_flags(shards), global_batch=4, iters=iters, lr="1e-3")


def _wait_for_lines(path: Path, n: int, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early ({proc.returncode}): {proc.communicate(timeout=60)[0][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} lines in {path} after {timeout} s")


# ----------------------------------------------------------------------------- the --save writer lock


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _plant(save: Path, **fields):
    record = {
        "host": socket.gethostname(),
        "pid": 0,
        "pid_start": None,
        "started": "earlier",
        "run_id": "other",
        "command": "pretrain_gpt --save x",
        **fields,
    }
    (save / save_lock.LOCK_FILENAME).write_text(json.dumps(record))
    return save / save_lock.LOCK_FILENAME


def test_lock_of_a_live_run_is_refused_naming_it(tmp_path):
    holder = _sleeper()
    try:
        lock = _plant(tmp_path, pid=holder.pid, pid_start=save_lock._process_start(holder.pid))
        with pytest.raises(
            ConfigError,
            match=rf"--save {tmp_path} is in use by another run on this host: "
            rf"pid {holder.pid} .*give this run another --save",
        ):
            save_lock.acquire(tmp_path)
        assert json.loads(lock.read_text())["run_id"] == "other"  # untouched
        # Another host's record, refreshed recently: refused, naming the file to delete if that run is gone.
        _plant(tmp_path, host="node-elsewhere", pid=holder.pid)
        with pytest.raises(ConfigError, match=rf"on host node-elsewhere .*delete {lock}"):
            save_lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_stale_locks_are_taken_over_and_released(tmp_path, caplog):
    dead = _sleeper()
    dead.kill()
    dead.wait(timeout=60)
    lock = _plant(tmp_path, pid=dead.pid)
    mine = save_lock.acquire(tmp_path)
    assert "no longer running" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid() and mine.holds()
    assert save_lock.acquire(tmp_path).holds()  # this process again (a resume of its own --save): no error
    save_lock.release_all()
    assert not lock.exists()
    # Another host's record untouched for longer than the heartbeat allows: taken over.
    lock = _plant(tmp_path, host="node-elsewhere", pid=12345)
    old = time.time() - save_lock.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    assert save_lock.acquire(tmp_path).holds()
    assert "last refreshed" in caplog.text
    save_lock.release_all()
    assert not lock.exists()


# ----------------------------------------------------------------------------- readers vs --keep-last rotation


@pytest.fixture
def two_checkpoints(tmp_path):
    """A torch-format checkpoint root with iterations 1 and 2 (saved in this process: no ranks)."""
    root = tmp_path / "ckpt"
    for it in (1, 2):
        ckpt.save_checkpoint(root, it, {"w": torch.full((4,), float(it))}, common_state={"iteration": it})
    return root


def _rotate_on_first(monkeypatch, module, name, root, newest=2):
    """Make ``module.name`` run the writer's --keep-last 1 rotation (as a run saving ``newest``) first."""
    real = getattr(module, name)
    fired = []

    def racing(*args, **kwargs):
        if not fired:
            fired.append(True)
            ckpt._cleanup(root, newest, 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, racing)


REMOVED = r"checkpoint .*iter_0000001 was removed while it was being read .*--keep-last.*--ckpt-step N .*\[2\]"


def test_load_of_a_rotated_checkpoint_names_the_fix(two_checkpoints, monkeypatch):
    _rotate_on_first(monkeypatch, torch, "load", two_checkpoints)
    with pytest.raises(CheckpointError, match=REMOVED):
        ckpt.load_checkpoint(two_checkpoints, iteration=1)


def test_verify_of_a_rotated_checkpoint_names_the_fix(two_checkpoints, monkeypatch):
    ckpt_dir, meta = ckpt.resolve_checkpoint(two_checkpoints, 1)
    _rotate_on_first(monkeypatch, ckpt, "file_record", two_checkpoints)  # the converter's first read
    with pytest.raises(CheckpointError, match=REMOVED):
        ckpt.verify_checkpoint(ckpt_dir, meta)


def test_resolve_of_a_rotated_checkpoint_names_the_fix(two_checkpoints, monkeypatch):
    _rotate_on_first(monkeypatch, ckpt, "check_listing", two_checkpoints)
    with pytest.raises(CheckpointError, match=REMOVED):
        ckpt.resolve_checkpoint(two_checkpoints, 1)


def test_distributed_load_of_a_rotated_checkpoint_names_the_fix(two_checkpoints, monkeypatch):
    from megatron.core import dist_checkpointing

    ckpt_dir, meta = ckpt.resolve_checkpoint(two_checkpoints, 1)
    meta = {**meta, "ckpt_format": "torch_dist"}

    def load(sharded_state, path):  # what torch's reader meets: the directory went away under it
        ckpt._cleanup(two_checkpoints, 2, 1)
        open(Path(path) / ".metadata", "rb")

    monkeypatch.setattr(dist_checkpointing, "load", load)
    with pytest.raises(CheckpointError, match=REMOVED):
        ckpt.load_distributed_checkpoint(ckpt_dir, meta, {}, verified=True)


# ----------------------------------------------------------------------------- two runs, Ctrl-C


def test_second_writer_is_refused_and_ctrl_c_is_one_line(shards, tmp_path):
    save = tmp_path / "ckpt"
    log = tmp_path / "first"
    # Far more iterations than it can run before the SIGINT below: on an idle machine 500 finished first.
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_dga.pretrain_gpt",
            *_argv(shards, log, ["--save", str(save), "--save-interval", "2"], iters=1_000_000),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_lines(log / "metrics.jsonl", 3, first)
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_dga.pretrain_gpt",
                *_argv(shards, tmp_path / "second", ["--save", str(save)]),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert f"--save {save} is in use by another run on this host: pid {first.pid}" in second.stderr
        assert not (tmp_path / "second" / "metrics.jsonl").exists()  # refused before any work
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    last = ckpt.latest_iteration(save)
    assert last is not None and last >= 2
    assert f"; the last checkpoint is iteration {last} under --save {save}" in out, out[-2000:]
    assert "pass --exit-signal-handler" in out
    assert not (save / save_lock.LOCK_FILENAME).exists()  # released on the way out


# A Ctrl-C that lands while a checkpoint save forks its writers (simulated: the fork hook sends it).
_CTRL_C_DURING_FORK = """
import multiprocessing, os, signal, sys
from megatron_dga.training.stopping import interrupt_deferred
sent = []
def ctrl_c_now():
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
os.register_at_fork(after_in_parent=ctrl_c_now)
def save():
    p = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    p.start()
    p.join(timeout=60)
try:
    if sys.argv[1] == "deferred":
        with interrupt_deferred():
            save()
            print("save complete", flush=True)
    else:
        save()
    print("went on after Ctrl-C", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


@pytest.mark.parametrize("mode", ["plain", "deferred"])
def test_ctrl_c_during_a_checkpoint_fork_is_not_lost(mode):
    # Python drops a KeyboardInterrupt raised in an after-fork hook ("Exception ignored"): a run
    # Ctrl-C'd while megatron's torch_dist writer forked went on (and hung at a later save, with
    # logging's lock left held). Trainer.save_checkpoint runs under interrupt_deferred, which raises
    # it once the save is complete.
    out = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_FORK, mode], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if mode == "plain":  # the hazard itself, so this test notices if Python stops dropping it
        assert "Exception ignored" in out.stderr and "went on after Ctrl-C" in out.stdout, out
    else:
        assert out.stdout.splitlines() == ["save complete", "KeyboardInterrupt"], out
        assert "Exception ignored" not in out.stderr, out.stderr


# ----------------------------------------------------------------------------- SIGTERM to the launch script


def test_sigterm_to_the_launch_script_saves_on_both_ranks_and_exits_zero(shards, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    # The documented GPU launch (it has --exit-signal-handler), made tiny and CPU-sized by the extra flags.
    extra = [
        "--data-path",
        *shards["domains"],
        "--specific-data-path",
        shards["specific"],
        *NULL_TOKENIZER_ARGS,
        *TINY_GPT_ARGS,
        "--no-bf16",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "1000",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--dga-domain-batch-size",
        "2",
        "--dga-specific-batch-size",
        "2",
        "--no-use-distributed-optimizer",
    ]
    proc = subprocess.Popen(
        ["bash", str(ROOT / "examples" / "pretrain_gpt_dga.sh"), *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_lines(run_dir / "metrics.jsonl", 2, proc)
        proc.send_signal(signal.SIGTERM)  # to the script's shell only, as a scheduler's batch signal
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-4000:]
    stopped = ckpt.latest_iteration(run_dir / "checkpoints")
    assert stopped is not None and f"exiting at iteration {stopped}: received SIGTERM" in out, out[-3000:]


# ----------------------------------------------------------------------------- errors that name the flag (class 6)


def test_min_loss_scale_above_initial_names_both_flags():
    from megatron_dga.training.arguments import parse_args

    with pytest.raises(
        ConfigError,
        match=r"--min-loss-scale 1024 is above --initial-loss-scale 1: .*give "
        r"--min-loss-scale <= --initial-loss-scale",
    ):
        parse_args(["--mock-data", "--fp16", "--initial-loss-scale", "1", "--min-loss-scale", "1024"])
    with pytest.raises(ConfigError, match=r"--min-loss-scale 1 \(the default\) is above --initial-loss-scale 0.5"):
        parse_args(["--mock-data", "--fp16", "--initial-loss-scale", "0.5"])
    parse_args(["--mock-data", "--fp16", "--initial-loss-scale", "1024", "--min-loss-scale", "1024"])


def test_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from megatron_dga.training.arguments import parse_args

    path = tmp_path / "run.yaml"
    path.write_bytes(b"train-iters: 5\nlog-dir: caf\xe9\n")  # Latin-1
    with pytest.raises(
        ConfigError,
        match=rf"--config {path}: not UTF-8 text \(byte b'\\xe9' at offset 27, line 2\); "
        "save the file as UTF-8",
    ):
        parse_args(["--config", str(path)])
    path.write_bytes(b"\xef\xbb\xbftrain-iters: 5\n")  # UTF-8 with a byte-order mark is UTF-8
    assert parse_args(["--config", str(path), "--mock-data"]).schedule.train_iters == 5


@pytest.mark.parametrize("kind", ["text", "npy", "pickle"])
def test_basis_that_is_not_an_npz_never_suggests_pickle(tmp_path, kind):
    import pickle

    import numpy as np

    from megatron_dga.errors import DataError
    from megatron_dga.mixing.weights_io import load_basis

    path = tmp_path / "basis.txt"
    if kind == "text":
        path.write_text("law 0.5 0.5 0\n")
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.eye(2))
    else:
        path.write_bytes(pickle.dumps({"matrix": [[1.0]]}))
    with pytest.raises(DataError) as err:
        load_basis(path)
    assert "cannot read as a basis .npz: not an .npz archive" in str(err.value)
    assert "tools/importance_weights.py --basis-output" in str(err.value)
    assert "pickle=" not in str(err.value) and "pickle.load" not in str(err.value)


BASIS_MATRIX = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]


def _basis_resumes(rank, world_size, runs):
    """Each (argv, expect_error) in turn in this process: the ConfigError's message, or None after train()."""
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    out = []
    for argv in runs:
        cfg = parse_args(argv)
        try:
            Trainer(cfg, platform.initialize(cfg.parallel)).train()
            out.append(None)
        except ConfigError as exc:
            out.append(str(exc))
    platform.shutdown()
    return out


def test_resume_with_dga_basis_added_or_dropped_names_the_flag(shards, tmp_path):
    from megatron_dga.mixing.weights_io import save_basis
    from tests.helpers.dist_utils import run_distributed, run_trainers

    basis = str(tmp_path / "basis.npz")
    save_basis(basis, np.asarray(BASIS_MATRIX), ["law", "news"], ["dom0", "dom1", "dom2"])
    dga = ["--mixing", "dga", "--dga-interval", "1", "--dga-specific-batch-size", "4", "--lr-decay-iters", "10"]
    with_basis, plain = str(tmp_path / "with_basis"), str(tmp_path / "plain")
    run_trainers(
        {
            "with_basis": _argv(shards, tmp_path / "a", [*dga, "--dga-basis", basis, "--save", with_basis], 2),
            "plain": _argv(shards, tmp_path / "b", [*dga, "--save", plain], 2),
        }
    )
    resumed = run_distributed(
        _basis_resumes,
        1,
        args=(
            [
                _argv(shards, tmp_path / "c", [*dga, "--dga-basis", basis, "--load", plain], 3),
                _argv(shards, tmp_path / "d", [*dga, "--load", with_basis], 3),
                _argv(shards, tmp_path / "e", [*dga, "--dga-basis", basis, "--load", plain, "--reset-mixing-state"], 3),
                _argv(shards, tmp_path / "f", [*dga, "--load", with_basis, "--reset-mixing-state"], 3),
            ],
        ),
    )[0]
    added, dropped, added_reset, dropped_reset = resumed
    assert added is not None and added.startswith(
        f"--dga-basis: the checkpoint {plain}/iter_0000002 was trained without --dga-basis, this run adds --dga-basis;"
    ), added
    assert dropped is not None and dropped.startswith(
        f"--dga-basis: the checkpoint {with_basis}/iter_0000002 was trained with --dga-basis (bases ['law', "
        "'news']), this run drops --dga-basis;"
    ), dropped
    for message in (added, dropped):
        assert "resume with the checkpoint's --dga-basis, or pass --reset-mixing-state" in message
    assert added_reset is None and dropped_reset is None  # the fix the message names works


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"--target-train \S+ holds no document with a non-empty \"text\""),
        ("plain text, not jsonl\n", r"--target-train: \S+:1: invalid JSON"),
        (
            '{"body": "x"}\n',
            r"--target-train: \S+:1: key 'text' missing \(keys present: \['body'\]\); give the target's",
        ),
    ],
)
def test_runner_checks_the_target_files_before_any_work(tmp_path, content, message):
    from megatron_dga.experiments import runner as ex
    from megatron_dga.errors import DataError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.jsonl").write_text('{"text": "some words"}\n')
    target = tmp_path / "target.jsonl"
    target.write_text(content)
    with pytest.raises(DataError, match=message):
        ex.prepare_jsonl_corpus(
            str(corpus), str(target), str(corpus / "a.jsonl"), str(tmp_path / "data"), vocab_size=64, seed=1, workers=1
        )
    assert not (tmp_path / "data").exists()  # no tokenizer trained, no shard written
