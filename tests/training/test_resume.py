"""Resume in the torch_dist format: on another TP/PP/DP layout, with the distributed
optimizer, and the checks a resume makes before loading anything (CPU, gloo).

Each layout case trains 8 iterations with DGA on layout A, saving at 4 and 8, then resumes
from iteration 4 on layout B and compares iterations 5-8 with A's own. Tolerances:
- DP changed: same data, same weights; only the order in which the data-parallel
  all-reduce adds the gradient shares differs, so equal to fp32 rounding (rtol 1e-5);
- TP or PP changed: the model-parallel split changes the order of the matmul and
  layer-norm reductions as well (rtol 1e-4).
"""

import re

import numpy as np
import pytest

from tests.helpers.dist_utils import run_pretrain
from tests.helpers.synthetic import data_flags, run_argv

DGA = ["--mixing", "dga", "--dga-interval", "2", "--dga-specific-batch-size", "8"]
FULLY_RESHARDABLE = ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
PAD_48 = ["--make-vocab-size-divisible-by", "48"]


def _argv(shards, run_dir, extra=(), iters=8):
    mixing = [] if "--mixing" in extra else DGA  # the --dga-* flags are an error with another --mixing
    return run_argv(run_dir, [*mixing, *extra], data=data_flags(shards), iters=iters)


def _losses(metrics, start=0):
    return np.array([m["lm_loss"] for m in metrics if m["iteration"] > start])


LAYOUTS = {
    # name: (layout A flags, world A, layout B flags, world B, rtol)
    # The distributed optimizer's state in Megatron's default dp_reshardable format moves to another DP size.
    "distopt_dp1_to_dp2": (["--use-distributed-optimizer"], 1, ["--use-distributed-optimizer"], 2, 1e-5),
    # megatron's FP32 optimizer: its state reshards with the model's.
    "tp2_to_tp1": (["--tensor-model-parallel-size", "2"], 2, [], 1, 1e-4),
    # The distributed optimizer's state in the fully_reshardable format moves to another TP/PP layout
    # (gathered on every rank, or on DP rank 0 over gloo).
    "distopt_tp2_to_dp2": (
        ["--tensor-model-parallel-size", "2", *FULLY_RESHARDABLE],
        2,
        ["--use-distributed-optimizer"],
        2,
        1e-4,
    ),
    "distopt_pp2_to_pp1_mem_efficient": (
        ["--pipeline-model-parallel-size", "2", *FULLY_RESHARDABLE, "--distrib-optim-fully-reshardable-mem-efficient"],
        2,
        ["--use-distributed-optimizer"],
        1,
        1e-4,
    ),
    # The 128-token vocabulary pads to 144 entries at TP=1 and to 192 at TP=2 (multiples of 48 x TP): the
    # checkpoint's padded rows and the new zero rows stay out of the loss, so the same model computes the same.
    "tp1_to_tp2_padded_vocab": (PAD_48, 1, ["--tensor-model-parallel-size", "2", *PAD_48], 2, 1e-4),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_resume_on_another_layout_continues_the_run(shards, tmp_path, case):
    flags_a, world_a, flags_b, world_b, rtol = LAYOUTS[case]
    ckpt = str(tmp_path / "ckpt")
    rcs, straight = run_pretrain(
        _argv(shards, tmp_path / "a", flags_a + ["--save", ckpt, "--save-interval", "4"]), world_a
    )
    assert set(rcs) == {0}
    rcs, resumed = run_pretrain(_argv(shards, tmp_path / "b", flags_b + ["--load", ckpt, "--ckpt-step", "4"]), world_b)
    assert set(rcs) == {0}
    assert [m["iteration"] for m in resumed] == [5, 6, 7, 8]
    # Iteration 5: the checkpoint's weights on the same batch; only the order of the sums differs.
    np.testing.assert_allclose(_losses(resumed)[0], _losses(straight, 4)[0], rtol=1e-6)
    np.testing.assert_allclose(_losses(resumed), _losses(straight, 4), rtol=rtol)
    # The sampler stream and the DGA weights continue: same weights after the updates at 6 and 8.
    for a, b in zip([m for m in straight if m["iteration"] > 4], resumed):
        np.testing.assert_allclose(b["domain_weights"], a["domain_weights"], rtol=10 * rtol, atol=1e-7)
        assert b["consumed_samples"] == a["consumed_samples"]


def test_distributed_optimizer_resume_is_bit_identical(shards, tmp_path):
    extra = ["--use-distributed-optimizer"]
    rcs, straight = run_pretrain(_argv(shards, tmp_path / "a", extra), 2)
    assert set(rcs) == {0}
    ckpt = str(tmp_path / "ckpt")
    rcs, _ = run_pretrain(_argv(shards, tmp_path / "b", extra + ["--save", ckpt, "--exit-interval", "4"]), 2)
    assert set(rcs) == {0}
    rcs, resumed = run_pretrain(_argv(shards, tmp_path / "b", extra + ["--load", ckpt]), 2)
    assert set(rcs) == {0}
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    assert resumed[-1]["domain_weights"] == straight[-1]["domain_weights"]
    # Megatron's default dp_reshardable format cannot move to another TP: refused before loading.
    rc, err = _resume_error(
        shards, tmp_path / "c", extra + ["--load", ckpt, "--tensor-model-parallel-size", "2"], nproc=2
    )
    assert rc != 0 and "dp_reshardable format for TP=1 PP=1" in err and "--dist-ckpt-optim-fully-reshardable" in err, (
        err[-3000:]
    )
    assert not re.search(r'File ".*megatron_dga/', err), err[-3000:]  # torchrun's own report of the exit is fine


# ----------------------------------------------------------------------------- checks before loading


@pytest.fixture(scope="module")
def saved(shards, tmp_path_factory):
    """A DGA checkpoint at iteration 4 (torch_dist), shared by the check tests."""
    run_dir = tmp_path_factory.mktemp("saved")
    ckpt = str(run_dir / "ckpt")
    rcs, _ = run_pretrain(_argv(shards, run_dir / "log", ["--save", ckpt], iters=4))
    assert rcs == [0]
    return ckpt


def _resume_error(shards, tmp_path, argv_extra, data_path=None, nproc=1):
    """(exit code, stderr) of the trainer as users start it: one process, or torchrun over gloo."""
    import os
    import subprocess
    import sys

    from tests.helpers.dist_utils import WORKER_ENV, free_port

    argv = _argv(shards, tmp_path, argv_extra)
    if data_path is not None:
        i = argv.index("--data-path")
        argv[i + 1 : i + 1 + len(shards["domains"])] = data_path
    launcher = (
        []
        if nproc == 1
        else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    )
    proc = subprocess.run(
        [sys.executable, *launcher, "-m", "megatron_dga.pretrain_gpt", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1"},
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hidden-size", "64"], r"--hidden-size: the checkpoint .* was trained with 32, this run has 64"),
        (["--mixing", "uniform"], r"--mixing uniform: the checkpoint .* --mixing dga; .*--reset-mixing-state"),
        (["--use-distributed-optimizer"], r"--use-distributed-optimizer: the checkpoint .* saved without it"),
    ],
    ids=["model-shape", "mixing", "distopt"],
)
def test_resume_refuses_a_changed_job_before_loading(shards, saved, tmp_path, extra, message):
    rc, err = _resume_error(shards, tmp_path, ["--load", saved, *extra])
    assert rc == 2, err[-3000:]
    assert re.search(message, err), err[-3000:]
    assert "Traceback" not in err


def test_resume_refuses_other_domains(shards, saved, tmp_path):
    rc, err = _resume_error(shards, tmp_path, ["--load", saved], data_path=shards["domains"][:2] + [shards["specific"]])
    assert rc == 2 and "lacks ['dom2']" in err and "adds ['specific']" in err, err[-3000:]
    assert "Traceback" not in err


def test_resume_refuses_another_lr_schedule_naming_each_flag(shards, saved, tmp_path):
    # ``saved`` trained 4 iterations at --lr 3e-3 (cosine to --min-lr 3e-5, --weight-decay 0.01); this run asks
    # for 8 (the decay length) and other values of every schedule flag. megatron-core's scheduler would keep the
    # checkpoint's values silently (and decay over 4 iterations: the rest at --min-lr).
    rc, err = _resume_error(
        shards,
        tmp_path,
        ["--load", saved, "--lr", "1e-3", "--min-lr", "1e-5", "--lr-decay-style", "linear", "--weight-decay", "0.1"],
    )
    assert rc == 2, err[-3000:]
    for named in (
        "--lr: the checkpoint has 0.003, this run 0.001",
        "--min-lr: the checkpoint has 3e-05, this run 1e-05",
        "--lr-decay-style: the checkpoint has cosine, this run linear",
        "--weight-decay: the checkpoint has 0.01, this run 0.1",
        "decay length (--lr-decay-iters, else --train-iters): the checkpoint has 4, this run 8",
        "--override-opt_param-scheduler",
        "--use-checkpoint-opt_param-scheduler",
    ):
        assert named in err, (named, err[-3000:])
    assert "weight-decay length" not in err  # constant weight decay: its length changes nothing
    assert "Traceback" not in err


def test_extend_a_run_with_override_or_keep_the_checkpoint_schedule(shards, saved, tmp_path):
    import json
    import math

    from tests.helpers.dist_utils import run_trainers

    resume = ["--load", saved, "--lr", "1e-3"]  # 8 iterations (the checkpoint: 4), another peak LR
    runs = run_trainers(
        {
            "override": _argv(shards, tmp_path / "override", resume + ["--override-opt_param-scheduler"]),
            "keep": _argv(shards, tmp_path / "keep", resume + ["--use-checkpoint-opt_param-scheduler"]),
        }
    )
    lrs = {name: [m["lr"] for m in run["metrics"]] for name, run in runs.items()}
    assert [m["iteration"] for m in runs["override"]["metrics"]] == [5, 6, 7, 8]
    # This run's schedule: cosine from 1e-3 to 3e-5 over 8 iterations, continued at step 4 (iteration 5 is step 4).
    want = [3e-5 + (1e-3 - 3e-5) * 0.5 * (1 + math.cos(math.pi * step / 8)) for step in (4, 5, 6, 7)]
    np.testing.assert_allclose(lrs["override"], want, rtol=1e-6)
    # The checkpoint's: its decay ended at iteration 4, so the rest runs at its --min-lr; run_info.json says so.
    np.testing.assert_allclose(lrs["keep"], [3e-5] * 4, rtol=1e-6)
    info = json.loads((tmp_path / "keep" / "run_info.json").read_text())["config"]["optimizer"]
    assert (info["lr"], info["min_lr"], info["lr_decay_iters"]) == (3e-3, 3e-5, 4)


def test_schedule_differences_skip_values_that_do_not_act():
    from megatron_dga.training.config import OptimizerConfig, ScheduleConfig
    from megatron_dga.training.optim import schedule_differences, scheduler_arguments

    def sched(iters):
        return ScheduleConfig(train_iters=iters, global_batch_size=8, micro_batch_size=2)

    constant = OptimizerConfig(lr_decay_style="constant")
    saved = scheduler_arguments(constant, sched(4))
    # A constant LR: a longer run or another --min-lr changes no step's LR or weight decay.
    assert schedule_differences(saved, OptimizerConfig(lr_decay_style="constant", min_lr=0.0), sched(8)) == []
    assert schedule_differences(saved, OptimizerConfig(lr_decay_style="constant", lr=1e-3), sched(4)) == [
        ("--lr", 3e-4, 1e-3)
    ]
    cosine = scheduler_arguments(OptimizerConfig(), sched(4))
    assert [d[0] for d in schedule_differences(cosine, OptimizerConfig(weight_decay=0.1), sched(8))] == [
        "decay length (--lr-decay-iters, else --train-iters)",
        "--weight-decay",
    ]


def test_reordered_data_path_resumes_by_domain_name(shards, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    rcs, straight = run_pretrain(_argv(shards, tmp_path / "a", ["--save", ckpt, "--save-interval", "4"]))
    assert rcs == [0]
    argv = _argv(shards, tmp_path / "b", ["--load", ckpt, "--ckpt-step", "4"])
    i = argv.index("--data-path")
    argv[i + 1 : i + 4] = list(reversed(shards["domains"]))
    rcs, resumed = run_pretrain(argv)
    assert rcs == [0]
    np.testing.assert_array_equal(_losses(resumed), _losses(straight, 4))
    assert resumed[-1]["domain_weights"] == straight[-1]["domain_weights"]  # still in the checkpoint's order


def test_reset_mixing_state_starts_the_new_strategy_afresh(shards, saved, tmp_path):
    rcs, metrics = run_pretrain(
        _argv(
            shards,
            tmp_path,
            ["--load", saved, "--mixing", "uniform", "--reset-mixing-state", "--use-checkpoint-opt_param-scheduler"],
        )
    )
    assert rcs == [0]
    assert metrics[0]["iteration"] == 5
    for m in metrics:
        np.testing.assert_allclose(m["domain_weights"], [1 / 3] * 3)


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_exits_zero_and_resume_continues_exactly(shards, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from megatron_dga.training.checkpoint import latest_iteration

    iters = 100  # long enough that SIGTERM lands mid-run (sent after 5 of them), short for CI
    rcs, straight = run_pretrain(_argv(shards, tmp_path / "straight", iters=iters))
    assert rcs == [0]
    ckpt, log = str(tmp_path / "ckpt"), tmp_path / "preempted"
    argv = _argv(shards, log, ["--save", ckpt, "--exit-signal-handler"], iters=iters)
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_dga.pretrain_gpt", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics_file = log / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped = latest_iteration(ckpt)
    assert stopped is not None and 5 <= stopped < iters, out[-2000:]
    assert f"exiting at iteration {stopped}: received SIGTERM" in out
    rcs, resumed = run_pretrain(_argv(shards, log, ["--load", ckpt], iters=iters))
    assert rcs == [0]
    assert [m["iteration"] for m in resumed] == list(range(1, iters + 1))
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    assert resumed[-1]["domain_weights"] == straight[-1]["domain_weights"]


# ----------------------------------------------------------------------------- training health


def test_diverging_run_stops_naming_the_iteration_and_keeps_finite_checkpoints(shards, tmp_path):
    import subprocess
    import sys

    from megatron_dga.training.checkpoint import _list_iterations, latest_iteration

    ckpt = tmp_path / "ckpt"
    argv = _argv(
        shards,
        tmp_path / "log",
        ["--lr", "1e30", "--save", str(ckpt), "--save-interval", "1", "--keep-last", "1"],
        iters=20,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dga.pretrain_gpt", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the training loss is nan" in proc.stderr or "the training loss is inf" in proc.stderr, proc.stderr[-2000:]
    assert "stopped without saving" in proc.stderr and "Traceback" not in proc.stderr
    stopped = int(re.search(r"error \(rank \d+\): iteration (\d+): ", proc.stderr).group(1))
    kept = _list_iterations(ckpt)
    assert kept and max(kept) < stopped, (kept, stopped)
    assert latest_iteration(ckpt) == kept[-1]  # the tracker names the last finite checkpoint


def test_exit_duration_saves_and_exits_zero(shards, tmp_path):
    from megatron_dga.training.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    rcs, metrics = run_pretrain(_argv(shards, tmp_path, ["--save", ckpt, "--exit-duration-in-mins", "1e-6"]))
    assert rcs == [0]
    assert latest_iteration(ckpt) == 1 and [m["iteration"] for m in metrics] == [1]


def _train_first_with_the_v2_sampler_state(rank, world_size, runs):
    """The "first" run saves its sampler state as megatron-dga/mixture-sampler-v2 did (the weights and
    basis weights inside); the other runs use today's code."""
    from megatron_dga import platform
    from megatron_dga.data.sampler import DynamicMixtureSampler
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.metrics import read_metrics
    from megatron_dga.training.trainer import Trainer

    today = DynamicMixtureSampler.state_dict

    def v2_state_dict(self):
        state = today(self)
        return {
            **state,
            "format": "megatron-dga/mixture-sampler-v2",
            "weights": self._weights.tolist(),
            "basis_weights": None if self._gamma is None else self._gamma.tolist(),
            "basis_fingerprint": self._basis_fingerprint if self._gamma is not None else None,
        }

    out = {}
    for name, argv in runs.items():
        DynamicMixtureSampler.state_dict = v2_state_dict if name == "first" else today
        cfg = parse_args(argv)
        Trainer(cfg, platform.initialize(cfg.parallel)).train()
        log_dir = argv[argv.index("--log-dir") + 1]
        out[name] = read_metrics(f"{log_dir}/metrics.jsonl")
    DynamicMixtureSampler.state_dict = today
    platform.shutdown()
    return out


def test_a_checkpoint_with_the_v2_sampler_state_still_resumes_bit_identically(shards, tmp_path):
    from tests.helpers.dist_utils import run_distributed

    ckpt = str(tmp_path / "ckpt")
    runs = run_distributed(
        _train_first_with_the_v2_sampler_state,
        world_size=1,
        args=(
            {
                "straight": _argv(shards, tmp_path / "a"),
                "first": _argv(shards, tmp_path / "b", ["--exit-interval", "4", "--save", ckpt]),
                "resumed": _argv(shards, tmp_path / "b", ["--load", ckpt]),
            },
        ),
    )[0]
    assert [m["iteration"] for m in runs["resumed"]] == list(range(1, 9))
    assert [m["lm_loss"] for m in runs["resumed"]] == [m["lm_loss"] for m in runs["straight"]]
    assert [m["domain_weights"] for m in runs["resumed"]] == [m["domain_weights"] for m in runs["straight"]]
    assert runs["straight"][-1]["domain_weights"] != runs["straight"][3]["domain_weights"]  # DGA moved them after 4
