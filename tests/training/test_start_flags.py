"""Issue 13, Megatron's schedule, data and checkpoint-start flags, with Megatron's meanings.

--train-samples, --lr-warmup-fraction, --lr-warmup-samples, --lr-decay-samples (the schedule
in samples, mapped onto megatron-core's OptimizerParamScheduler in iterations);
--rampup-batch-size (refused); --data-cache-path, --data-args-path,
--per-split-data-args-path, --mock-data; --finetune, --no-load-optim, --no-load-rng.

The trainer-level checks run all their jobs in one spawned gloo process (the ``runs`` fixture):
a process start costs seconds, a tiny job a fraction of one.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from megatron_dga.errors import ConfigError
from megatron_dga.training.arguments import parse_args
from tests.helpers.dist_utils import run_distributed
from tests.helpers.synthetic import run_argv, three_domain_shards, write_domains

PLAIN = ["--data-path", "x/a_text_document", "x/b_text_document"]


# ----------------------------------------------------------------------------- schedule in samples


def _lrs(arguments: dict, increment: int, steps: int):
    """The learning rate of each of ``steps`` iterations under megatron-core's scheduler."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = types.SimpleNamespace(param_groups=[{}])
    scheduler = OptimizerParamScheduler(optimizer, **arguments)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment)
    return np.array(lrs)


@pytest.mark.parametrize(
    "flags, iters",
    [
        (["--train-samples", "100", "--lr-warmup-samples", "24", "--lr-decay-samples", "80"], 6),
        (["--train-samples", "100", "--lr-warmup-fraction", "0.25"], 6),
        (["--train-iters", "6", "--lr-warmup-fraction", "0.25", "--lr-decay-iters", "5"], 6),
    ],
    ids=["samples", "samples-fraction", "iters-fraction"],
)
def test_the_lr_schedule_is_megatrons_in_samples(flags, iters):
    """Our scheduler counts iterations; Megatron-LM's counts samples (step += global batch size)."""
    from megatron_dga.training.optim import scheduler_arguments

    cfg = parse_args(PLAIN + ["--global-batch-size", "16", "--lr-decay-style", "linear", *flags])
    assert cfg.schedule.train_iters == iters  # 100 // 16: the last partial batch is dropped, as in Megatron
    ours = scheduler_arguments(cfg.optimizer, cfg.schedule)
    # Megatron-LM's get_optimizer_param_scheduler, in samples.
    opt, gbs = cfg.optimizer, 16
    if cfg.schedule.train_samples:
        decay, warmup, wd = opt.lr_decay_samples or cfg.schedule.train_samples, opt.lr_warmup_samples, 100
    else:
        decay, warmup, wd = opt.lr_decay_iters * gbs, opt.lr_warmup_iters * gbs, iters * gbs
    if opt.lr_warmup_fraction is not None:
        warmup = opt.lr_warmup_fraction * decay
    megatron = {**ours, "lr_warmup_steps": warmup, "lr_decay_steps": decay, "wd_incr_steps": wd}
    np.testing.assert_allclose(_lrs(ours, 1, iters), _lrs(megatron, gbs, iters), rtol=1e-12, atol=0)
    assert _lrs(ours, 1, iters)[0] == 0.0 and ours["lr_warmup_steps"] > 0  # the warmup is really there


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--train-samples", "100", "--train-iters", "5"],
            "--train-iters 5 and --train-samples 100 both set the length of the run (Megatron takes one); keep one",
        ),
        (["--train-samples", "10"], "--train-samples 10 is less than one --global-batch-size 16: no step would run"),
        (
            ["--train-samples", "100", "--lr-decay-iters", "7"],
            "--lr-decay-iters 7 with --train-samples 100: a run by samples counts its LR schedule in samples",
        ),
        (
            ["--lr-warmup-samples", "32"],
            "--lr-warmup-samples 32 given without --train-samples: with --train-iters the "
            "LR schedule counts iterations",
        ),
        (
            ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"],
            "--lr-warmup-fraction 0.1 and --lr-warmup-iters 3 both set the warmup (Megatron takes one)",
        ),
        (["--lr-warmup-fraction", "1"], "--lr-warmup-fraction must be in [0, 1)"),
        (
            ["--rampup-batch-size", "4", "4", "1000"],
            "--rampup-batch-size 4 4 1000: ramping up the global batch size is "
            "not supported; every global batch is drawn at --global-batch-size 16",
        ),
        (
            ["--mock-data"],
            "--data-path x/a_text_document x/b_text_document and --mock-data each give the training data",
        ),
        (["--data-cache-path", "c"], None),  # accepted with --data-path (the Trainer checks it is writable)
        (["--finetune"], "--finetune given without --load"),
        (["--no-load-optim", "--no-load-rng"], "--no-load-optim, --no-load-rng given without --load"),
        (
            ["--load", "c", "--finetune", "--no-load-rng", "--reset-mixing-state"],
            "--no-load-rng, --reset-mixing-state with --finetune, which loads the model weights only",
        ),
    ],
)
def test_schedule_and_start_flags_are_checked_at_start_up(argv, message):
    if message is None:
        parse_args(PLAIN + argv)
        return
    with pytest.raises(ConfigError) as exc:
        parse_args(PLAIN + ["--global-batch-size", "16", *argv])
    assert message in str(exc.value), str(exc.value)


def test_a_resolved_config_validates_again(tmp_path):
    """dataclasses.replace re-runs the checks on the filled-in values (train_iters, data_path)."""
    import dataclasses

    args = tmp_path / "data.txt"
    args.write_text("0.3 x/a_text_document\n0.7 x/b_text_document\n")
    cfg = parse_args(["--data-args-path", str(args), "--train-samples", "64", "--global-batch-size", "16"])
    assert dataclasses.replace(cfg.schedule).train_iters == 4
    assert dataclasses.replace(cfg.data).data_path == cfg.data.data_path


# ----------------------------------------------------------------------------- data-args files


def test_data_args_files_give_the_data_path(tmp_path):
    args = tmp_path / "data.txt"
    args.write_text("0.3 x/a_text_document\n0.7   x/b_text_document\n")
    cfg = parse_args(["--data-args-path", str(args)])
    assert cfg.data.data_path == ["0.3", "x/a_text_document", "0.7", "x/b_text_document"]
    assert cfg.mixing.strategy == "static"  # the weights mean what they mean in --data-path
    with pytest.raises(ConfigError, match=r"^--data-path x/a_text_document x/b_text_document and --data-args-path "):
        parse_args(PLAIN + ["--data-args-path", str(args)])
    args.write_text("0.3 x/a_text_document 0.7")
    with pytest.raises(ConfigError, match="--data-args-path .*: '0.3 x/a_text_document 0.7': the weighted form"):
        parse_args(["--data-args-path", str(args)])

    split = tmp_path / "split.json"
    split.write_text(
        json.dumps(
            {
                "train": "x/a_text_document x/b_text_document",
                "valid": ["v/b_text_document", "v/a_text_document"],
                "test": [],
            }
        )
    )
    cfg = parse_args(["--per-split-data-args-path", str(split)])
    assert cfg.data.data_path == ["x/a_text_document", "x/b_text_document"]
    assert cfg.data.per_split_valid_prefixes == ["v/a_text_document", "v/b_text_document"]  # matched to train by name
    assert cfg.data.train_fraction == 1.0  # Megatron's per-split blends use whole shards
    for body, message in [
        (
            {"train": ["x/a_text_document"], "valid": ["v/c_text_document"]},
            "\"valid\" names domains ['c'], \"train\" ['a']; the held-out sets are the per-domain eval sets, matched "
            "by name",
        ),
        ({"train": ["x/a_text_document"], "valid": ["1", "v/a_text_document"]}, "\"valid\" gives weights"),
        (
            {"train": ["x/a_text_document"], "test": ["t/a_text_document"]},
            "\"test\" gives t/a_text_document, but this trainer runs no test evaluation",
        ),
        ({"valid": ["v/a_text_document"]}, "\"train\" is missing or empty"),
        ({"train": ["x/a_text_document"], "tests": []}, "unknown keys ['tests']"),
    ]:
        split.write_text(json.dumps(body))
        with pytest.raises(ConfigError) as exc:
            parse_args(["--per-split-data-args-path", str(split)])
        assert message in str(exc.value), str(exc.value)
    split.write_text(json.dumps({"train": ["x/a_text_document"]}))
    with pytest.raises(ConfigError, match="--split 90,10 with --per-split-data-args-path .* would be ignored"):
        parse_args(["--per-split-data-args-path", str(split), "--split", "90,10"])


# ----------------------------------------------------------------------------- trainer-level runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every trainer-level job of this module, in one spawned process: {name: results}."""
    shards = three_domain_shards(str(tmp_path_factory.mktemp("shards")))
    return run_distributed(_all_runs, world_size=1, args=(shards, str(tmp_path_factory.mktemp("runs"))))[0]


def _all_runs(rank, world_size, shards, tmp):
    return {
        **_data_flag_runs(shards, os.path.join(tmp, "data")),
        **_checkpoint_flag_runs(shards, os.path.join(tmp, "ckpt")),
    }


def _argv(run_dir, extra=(), iters=3, data=None):
    return run_argv(run_dir, extra, data=["--data-path", *data] if data is not None else [], iters=iters)


def _main(argv):
    """The trainer's entry point in this (spawned) process: its metrics, or AssertionError."""
    from megatron_dga.pretrain_gpt import main
    from megatron_dga.training.metrics import read_metrics

    assert main(argv) == 0, argv
    return read_metrics(os.path.join(argv[argv.index("--log-dir") + 1], "metrics.jsonl"))


def _dataset_build_seconds(argv):
    """``_main(argv)`` and the seconds its data pipeline spent building the datasets (megatron's indices)."""
    import time

    from megatron_dga.training import data as pipeline

    real, spent = pipeline.build_domain_datasets, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = real(*args, **kwargs)
        spent.append(time.perf_counter() - start)
        return result

    pipeline.build_domain_datasets = timed
    try:
        return _main(argv), sum(spent)
    finally:
        pipeline.build_domain_datasets = real


def _data_flag_runs(shards, tmp):
    cache = os.path.join(tmp, "cache")
    data = shards["domains"]
    eval_flags = ["--eval-interval", "3", "--eval-iters", "1", "--specific-data-path", shards["specific"]]

    def cached_files():
        return {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in sorted(os.listdir(cache))}

    out = {"plain": _main(_argv(f"{tmp}/plain", eval_flags, data=data))}
    cached = eval_flags + ["--data-cache-path", cache]
    out["first"], out["first_s"] = _dataset_build_seconds(_argv(f"{tmp}/first", cached, data=data))
    out["files_after_first"] = cached_files()
    out["second"], out["second_s"] = _dataset_build_seconds(_argv(f"{tmp}/second", cached, data=data))
    out["files_after_second"] = cached_files()
    # --per-split-data-args-path: "valid" shards (same domain names, another directory) are the eval sets.
    valid = write_domains(os.path.join(tmp, "valid"), k=3, docs_per_domain=8, doc_len=64, seed=5)["domains"]
    for name, held_out in (("per_split", list(reversed(valid))), ("per_split_no_valid", [])):
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as fh:
            json.dump({"train": data, "valid": held_out, "test": []}, fh)
        out[name] = _main(_argv(f"{tmp}/{name}", eval_flags + ["--per-split-data-args-path", path]))
    out["mock"] = _main(_argv(f"{tmp}/mock", ["--mock-data", "--mixing", "uniform"]))
    return out


def _losses(metrics):
    return [m["lm_loss"] for m in metrics]


def test_data_cache_data_args_and_mock_data_train(runs):
    out = runs
    print(
        f"datasets built in {out['first_s'] * 1e3:.0f} ms by the first run with --data-cache-path (writes the "
        f"cache), {out['second_s'] * 1e3:.0f} ms by the second (reads it)"
    )
    # The cache holds megatron's indices of every dataset: 3 domains x (train part, held-out part) + the
    # specific set, one description and three .npy files each; the second run read them and wrote nothing.
    files = out["files_after_first"]
    assert sum(n.endswith("-description.txt") for n in files) == 7, sorted(files)
    assert sum(n.endswith("-GPTDataset-valid-description.txt") for n in files) == 3  # own entries, not the train part's
    assert out["files_after_second"] == files
    # Cached or not, the same samples: losses and held-out eval losses bit-identical.
    for run in ("first", "second"):
        assert _losses(out[run]) == _losses(out["plain"])
        assert out[run][-1]["domain_eval_loss"] == out["plain"][-1]["domain_eval_loss"]
    # --per-split-data-args-path: trains on the "train" shards (whole: no --split) and evaluates each domain on
    # its "valid" shard; without "valid" it evaluates on training samples.
    with_valid, without = out["per_split"][-1]["domain_eval_loss"], out["per_split_no_valid"][-1]["domain_eval_loss"]
    assert len(with_valid) == 3 and np.isfinite(with_valid).all()
    assert all(a != b for a, b in zip(with_valid, without))
    assert _losses(out["per_split"]) == _losses(out["per_split_no_valid"]) != _losses(out["plain"])
    # --mock-data: synthetic domains, no --data-path.
    assert [m["iteration"] for m in out["mock"]] == [1, 2, 3]
    assert len(out["mock"][0]["domain_weights"]) == 3 and np.isfinite(_losses(out["mock"])).all()


def _checkpoint_flag_runs(shards, tmp):
    import torch

    from megatron_dga import platform
    from megatron_dga.training import resume
    from megatron_dga.training.step import forward_backward
    from megatron_dga.training.trainer import Trainer

    data = shards["domains"]
    dga = ["--mixing", "dga", "--dga-interval", "2", "--specific-data-path", shards["specific"]]
    ckpt, ckpt_torch = os.path.join(tmp, "ckpt"), os.path.join(tmp, "ckpt_torch")
    out = {}
    _main(_argv(f"{tmp}/a", dga + ["--save", ckpt], iters=4, data=data))
    _main(_argv(f"{tmp}/a_torch", dga + ["--save", ckpt_torch, "--ckpt-format", "torch"], iters=2, data=data))

    # Whole resumes, --no-load-optim and --no-load-rng, through the entry point.
    restored = []
    real_restore = resume.restore_rng_state
    resume.restore_rng_state = lambda state: restored.append(1) or real_restore(state)
    keep = ["--use-checkpoint-opt_param-scheduler"]  # 6 iterations on a checkpoint of 4: its LR schedule
    for name, flags in (
        ("resumed", keep),
        ("no_load_optim", ["--no-load-optim"]),
        ("no_load_rng", ["--no-load-rng", *keep]),
    ):
        restored.clear()
        out[name] = _main(_argv(f"{tmp}/{name}", dga + ["--load", ckpt, *flags], iters=6, data=data))
        out[f"{name}_rng_restored"] = len(restored)

    # --finetune in-process, to compare weights and losses with other trainers.
    def trainer(argv):
        cfg = parse_args(argv)
        return Trainer(cfg, ctx)

    ctx = platform.initialize(parse_args(_argv(tmp, data=data)).parallel)
    # A new mixture over other data: two of the three domains, reordered, uniform mixing.
    new_data = [data[1], data[0]]
    finetune = ["--load", ckpt, "--finetune", "--mixing", "uniform"]
    tuned = trainer(_argv(f"{tmp}/tuned", finetune, data=new_data))
    whole = trainer(_argv(f"{tmp}/whole", dga + ["--load", ckpt, *keep], iters=6, data=data))
    fresh = trainer(_argv(f"{tmp}/fresh", ["--mixing", "uniform"], data=new_data))
    out["tuned_start"] = (
        tuned.iteration,
        tuned.consumed_samples,
        tuned.data.sampler.batches_drawn,
        len(tuned.optimizer.inner.state_dict()["state"]),
        tuned.data.weights.tolist(),
    )
    out["tuned_weights_are_the_checkpoints"] = all(torch.equal(a, b) for a, b in zip(tuned.params, whole.params))
    # Its first loss is the checkpoint's model's loss on the first batch of the new mixture.
    first_loss = tuned.train_step()[0]
    rows = tuned.data.sampler.rank_micro_batches(tuned.data.loader.last_global_batch, 0, 1)
    micro_batches = [tuned.data.fetch(r) for r in rows]
    out["first_loss"] = first_loss
    out["checkpoint_model_loss"] = forward_backward(whole.ddp, micro_batches, ctx.device, forward_only=True).mean_loss
    out["fresh_model_loss"] = forward_backward(fresh.ddp, micro_batches, ctx.device, forward_only=True).mean_loss
    # bf16: the optimizer's fp32 master weights are refreshed from the loaded model (else its first step
    # would write the initial weights back).
    bf16 = trainer(_argv(f"{tmp}/bf16", finetune + ["--bf16"], data=new_data))
    chained = bf16.optimizer.inner.chained_optimizers
    out["bf16_master_is_model"] = all(
        torch.equal(main, model.float())
        for leaf in chained
        for gm, gf in zip(leaf.float16_groups, leaf.fp32_from_float16_groups)
        for model, main in zip(gm, gf)
    )
    # The legacy torch format.
    tuned_torch = trainer(
        _argv(f"{tmp}/tuned_torch", ["--load", ckpt_torch, "--finetune", "--mixing", "uniform"], data=new_data)
    )
    whole_torch = trainer(_argv(f"{tmp}/whole_torch", dga + ["--load", ckpt_torch, *keep], data=data))
    out["torch_format_weights"] = all(torch.equal(a, b) for a, b in zip(tuned_torch.params, whole_torch.params))
    # The model shape is still checked.
    try:
        trainer(_argv(f"{tmp}/shape", finetune + ["--hidden-size", "64"], data=new_data))
        out["shape_error"] = None
    except ConfigError as exc:
        out["shape_error"] = str(exc)
    platform.shutdown()
    return out


def test_finetune_no_load_optim_and_no_load_rng(runs):
    out = runs
    # --finetune: iteration 0, nothing consumed, no Adam state, the new mixture's initial weights, the
    # checkpoint's weights (legacy torch format too); the first loss is the checkpoint model's on that batch.
    assert out["tuned_start"] == (0, 0, 0, 0, [0.5, 0.5])
    assert out["tuned_weights_are_the_checkpoints"] and out["torch_format_weights"]
    assert out["first_loss"] == out["checkpoint_model_loss"] != out["fresh_model_loss"]
    assert out["bf16_master_is_model"]
    assert out["shape_error"].startswith("--hidden-size: the checkpoint"), out["shape_error"]
    # --no-load-optim: same weights and data at iteration 5 (same loss), then a fresh Adam and LR schedule.
    resumed, fresh_optim = out["resumed"], out["no_load_optim"]
    assert [m["iteration"] for m in fresh_optim] == [5, 6] == [m["iteration"] for m in resumed]
    assert fresh_optim[0]["lm_loss"] == resumed[0]["lm_loss"]
    assert fresh_optim[1]["lm_loss"] != resumed[1]["lm_loss"]
    assert fresh_optim[0]["lr"] == 3e-3 > resumed[0]["lr"]  # the schedule restarts (Megatron's meaning)
    # --no-load-rng: everything else resumes; the RNG states are not restored.
    assert (out["resumed_rng_restored"], out["no_load_rng_rng_restored"]) == (1, 0)
    assert _losses(out["no_load_rng"]) == _losses(resumed)
