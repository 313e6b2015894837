"""The pretraining loop end to end on CPU: resume, parallel layouts, mixing, bad configs."""

import os

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed, run_pretrain
from tests.helpers.synthetic import TINY_GPT_ARGS, data_flags, run_argv

MODEL = TINY_GPT_ARGS


def _args(shards, run_dir, iters, extra=()):
    return run_argv(run_dir, extra, data=data_flags(shards, specific_eval=True), model=MODEL, iters=iters)


def _run(argv, world_size=1):
    rcs, metrics = run_pretrain(argv, world_size)
    assert all(rc == 0 for rc in rcs), rcs
    return metrics


def _losses(metrics):
    return np.array([m["lm_loss"] for m in metrics])


def test_resume_is_bit_identical_with_dp2(shards, tmp_path):
    straight = _run(_args(shards, tmp_path / "a", 8, ["--mixing", "dga", "--dga-interval", "2"]), world_size=2)
    first = _run(
        _args(
            shards,
            tmp_path / "b",
            8,
            ["--mixing", "dga", "--dga-interval", "2", "--exit-interval", "4", "--save", str(tmp_path / "ckpt")],
        ),
        world_size=2,
    )
    # Same run to 8 iterations, resumed from the checkpoint at 4.
    resumed = _run(
        _args(shards, tmp_path / "b", 8, ["--mixing", "dga", "--dga-interval", "2", "--load", str(tmp_path / "ckpt")]),
        world_size=2,
    )
    assert [m["iteration"] for m in resumed] == list(range(1, 9))  # first half kept, crash-free append
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    np.testing.assert_array_equal(_losses(first), _losses(straight)[:4])
    for a, b in zip(resumed, straight):
        assert a["domain_weights"] == b["domain_weights"]


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_two_ranks_match_one_process(shards, tmp_path, layout):
    extra = ["--mixing", "dga", "--dga-interval", "2", "--dga-specific-batch-size", "8"]
    single = _run(_args(shards, tmp_path / "one", 6, extra))
    double = _run(_args(shards, tmp_path / "two", 6, extra + layout), world_size=2)
    np.testing.assert_allclose(_losses(double), _losses(single), rtol=2e-5)
    np.testing.assert_allclose(double[-1]["domain_weights"], single[-1]["domain_weights"], rtol=1e-4, atol=1e-7)


def test_loss_decreases_and_static_mixing_realises_weights(shards, tmp_path):
    weights = [0.6, 0.3, 0.1]
    data_path = [tok for w, p in zip(weights, shards["domains"]) for tok in (str(w), p)]
    argv = _args(shards, tmp_path, 30, ["--mixing", "static", "--lr-warmup-iters", "2"])
    argv[argv.index("--data-path") + 1 : argv.index("--data-path") + 4] = data_path
    metrics = _run(argv)
    losses = _losses(metrics)
    assert losses[-5:].mean() < losses[:5].mean() - 0.3, losses
    samples = np.sum([m["domain_samples"] for m in metrics], axis=0)
    # 30 batches of 8: the carried allocation keeps each count within one sample of its share.
    assert samples.sum() == 240
    np.testing.assert_allclose(samples, 240 * np.array(weights), atol=1.0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--global-batch-size", "6"], "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
        (["--num-attention-heads", "3"], "--hidden-size 32 is not divisible by --num-attention-heads 3"),
        (["--load", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["--mixing", "static"], "--mixing static needs weights in --data-path"),
        (["--mixing", "bogus"], "available: dga, importance, natural, odm, pike, static, uniform"),
        (["--vocab-size", "99"], "vocab"),
    ],
)
def test_bad_configurations_fail_before_training(shards, tmp_path, capsys, extra, message):
    argv = _args(shards, tmp_path, 2, ["--micro-batch-size", "4"])
    # Later flags win in argparse: the bad value overrides the good one.
    rc = run_distributed(_pretrain_rc, world_size=1, args=(argv + extra,))[0]
    assert rc[0] == 2
    assert message in rc[1], rc[1]
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def _pretrain_rc(rank, world_size, argv):
    import contextlib
    import io

    from megatron_dga.pretrain_gpt import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def test_missing_shard_is_named(shards, tmp_path):
    argv = _args(shards, tmp_path, 2)
    argv[argv.index("--data-path") + 1] = str(tmp_path / "nope_text_document")
    rc, err = run_distributed(_pretrain_rc, world_size=1, args=(argv,))[0]
    assert rc == 2 and "nope_text_document" in err, err


def test_crash_during_save_keeps_previous_checkpoint(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(_args(shards, tmp_path / "a", 4, ["--save", str(ckpt), "--save-interval", "2"]))
    # A second save dies after writing its files but before publishing them.
    rc, err = run_distributed(
        _pretrain_crash_in_save,
        world_size=1,
        args=(
            _args(
                shards,
                tmp_path / "b",
                6,
                [
                    "--load",
                    str(ckpt),
                    "--save",
                    str(ckpt),
                    "--save-interval",
                    "2",
                    "--use-checkpoint-opt_param-scheduler",
                ],
            ),
        ),
    )[0]
    assert rc == "crashed"
    from megatron_dga.training.checkpoint import latest_iteration

    assert latest_iteration(ckpt) == 4
    resumed = _run(_args(shards, tmp_path / "c", 5, ["--load", str(ckpt), "--use-checkpoint-opt_param-scheduler"]))
    assert resumed[-1]["iteration"] == 5


def _pretrain_crash_in_save(rank, world_size, argv):
    from megatron_dga.training import checkpoint

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during checkpoint publication")

    checkpoint._finalize = crash
    from megatron_dga.pretrain_gpt import EXIT_INTERRUPTED, main

    # main() turns the interrupt into its one-line message and exit code 130 (the save never published).
    return ("crashed" if main(argv) == EXIT_INTERRUPTED else "finished"), ""


def test_importance_weights_must_match_the_domains(shards, tmp_path):
    from megatron_dga.mixing.weights_io import save_weights

    path = tmp_path / "iw.json"
    save_weights(str(path), ["dom0", "dom1", "law"], [0.5, 0.25, 0.25])
    argv = _args(shards, tmp_path, 2, ["--mixing", "importance", "--importance-weights", str(path)])
    rc, err = run_distributed(_pretrain_rc, world_size=1, args=(argv,))[0]
    assert rc == 2 and "law" in err and "dom2" in err, err


def test_dga_without_specific_set_fails_up_front(shards, tmp_path):
    argv = _args(shards, tmp_path, 2, ["--mixing", "dga"])
    i = argv.index("--specific-data-path")
    del argv[i : i + 4]  # drop --specific-data-path and --specific-eval-data-path
    rc, err = run_distributed(_pretrain_rc, world_size=1, args=(argv,))[0]
    assert rc == 2 and "needs the specific set: pass --specific-data-path" in err, err


def test_dataloader_workers_give_the_same_run(shards, tmp_path):
    # Indices are drawn in the main process; workers only read samples, so the stream (and the
    # DGA weight changes reaching it) is the same with and without workers.
    extra = ["--mixing", "dga", "--dga-interval", "2"]
    inline = _run(_args(shards, tmp_path / "w0", 4, extra))
    workers = _run(_args(shards, tmp_path / "w2", 4, extra + ["--num-workers", "2"]))
    np.testing.assert_array_equal(_losses(workers), _losses(inline))
    assert workers[-1]["domain_weights"] == inline[-1]["domain_weights"]


def _pretrain_with_fake_wandb(rank, world_size, argv):
    import sys

    from megatron_dga.pretrain_gpt import main
    from megatron_dga.training.metrics import read_metrics
    from tests.helpers.fakes import FakeWandb

    fake = sys.modules["wandb"] = FakeWandb()  # this spawned rank's own module table
    rc = main(argv)
    metrics = read_metrics(argv[argv.index("--log-dir") + 1]) if rc == 0 else None
    return rc, fake.inits, fake.logs, fake.finished, metrics


def test_trainer_feeds_wandb_from_the_metrics_path(shards, tmp_path):
    from megatron_dga.training.metrics import MetricsLogger

    argv = _args(shards, tmp_path / "run", 2, ["--mixing", "dga", "--dga-interval", "2", "--wandb-project", "proj"])
    rc, inits, logs, finished, metrics = run_distributed(_pretrain_with_fake_wandb, world_size=1, args=(argv,))[0]
    assert rc == 0 and finished == 1 and len(inits) == 1
    init = inits[0]
    # Megatron's wandb.init arguments; the run is named after the log directory, and writes there.
    assert (init["project"], init["name"], init["dir"]) == ("proj", "run", str(tmp_path / "run"))
    assert init["config"]["logging"]["wandb_project"] == "proj" and init["config"]["mixing"]["strategy"] == "dga"
    # Every metrics.jsonl entry, as the TensorBoard tags, at its iteration.
    labels = MetricsLogger(
        "unused",
        is_writer=False,
        domain_names=[os.path.basename(p)[: -len("_text_document")] for p in shards["domains"]],
    )
    assert [step for step, _ in logs] == [m["iteration"] for m in metrics] == [1, 2]
    for (_, sent), entry in zip(logs, metrics):
        assert sent == dict(
            tag for key, value in entry.items() if key != "iteration" for tag in labels.tags_for(key, value)
        )
    assert "mixing/alignment/" + labels.domain_names[0] in logs[1][1]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_probe_overflow_check_finds_nan_and_inf_without_a_buffer_sized_temporary(dtype):
    """The fp16 probe check reads the grad buffers with reductions only: nothing the size of a buffer is allocated."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_dga.training.view import local_grads_not_finite

    class Buffer:
        def __init__(self, n):
            self.grad_data = torch.full((n,), 60000.0, dtype=getattr(torch, dtype))  # near fp16's largest

    class Chunk:
        def __init__(self, *sizes):
            self.buffers, self.expert_parallel_buffers = [Buffer(n) for n in sizes], []

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    chunks = [Chunk(4096, 1000), Chunk(3000)]
    with LargestOutput():
        assert float(local_grads_not_finite(chunks, "cpu")) == 0.0  # 7e8 in total: no float32 overflow
    assert LargestOutput.largest <= 1
    for bad in (float("nan"), float("inf"), float("-inf")):
        chunks[1].buffers[0].grad_data[1234] = bad
        assert float(local_grads_not_finite(chunks, "cpu")) == 1.0, bad
        chunks[1].buffers[0].grad_data[1234] = 0.0
    chunks[0].buffers[0].grad_data[[5, 9]] = torch.tensor([float("inf"), float("-inf")], dtype=getattr(torch, dtype))
    assert float(local_grads_not_finite(chunks, "cpu")) == 1.0  # +Inf and -Inf do not cancel


def _host_reads(rank, world_size, argv):
    """Host reads of tensor values during train(), by the innermost library frame that asked for them."""
    import collections
    import sys

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_dga import platform
    from tests.helpers.layouts import trainer_from

    trainer = trainer_from(argv)
    counts, phase = collections.Counter(), ["train"]

    def owner():
        frame = sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            if "/megatron_dga/data/" in path:
                return "data"  # the sampler and the batches are host data on a GPU machine too
            if "/megatron_dga/" in path:
                return "ours"
            if "/megatron/core/" in path:
                return "megatron"
            frame = frame.f_back
        return "other"

    def count():
        counts[(phase[0], owner())] += 1

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), float(t), bool(t)
                count()
            return func(*args, **(kwargs or {}))

    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def counted(name):
        def method(self, *args, **kwargs):
            count()
            return originals[name](self, *args, **kwargs)

        return method

    def in_phase(name, method):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return method(*args, **kwargs)
            finally:
                phase[0] = "train"

        return wrapped

    trainer._log = in_phase("log", trainer._log)
    trainer.save_checkpoint = in_phase("save", trainer.save_checkpoint)
    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        with Reads():
            trainer.train()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    platform.shutdown()
    return {f"{p}/{o}": n for (p, o), n in counts.items()}


@pytest.mark.parametrize(
    "extra, ours_per_step",
    [([], 0), (["--exit-signal-handler", "--save", "{tmp}/ckpt", "--save-interval", "1000"], 1)],
    ids=["plain", "exit_signal_handler"],
)
def test_a_training_step_reads_no_more_device_values_than_megatron(shards, tmp_path, extra, ours_per_step):
    """Per step the trainer adds no host read of a device value (a GPU sync) to megatron-core's own
    (its grad-norm read); --exit-signal-handler adds one, the stop flag, as Megatron's own handler does.
    The loss stays on the device until it is logged."""
    iters = 6
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = _args(
        shards, tmp_path / "run", iters, ["--log-interval", "100", "--mixing", "dga", "--dga-interval", "100", *extra]
    )
    reads = run_distributed(_host_reads, world_size=2, args=(argv,))[0]
    assert reads.get("train/ours", 0) == ours_per_step * (iters - 1), reads  # the last step stops anyway
    assert 1 <= reads.get("log/ours", 0) <= 2, reads  # the window's loss (and nothing per step)
    assert reads.get("train/megatron", 0) >= iters, reads  # megatron's grad norm: the count sees GPU syncs
