"""The GPU path's megatron-core classes, run in CI: one test per defect found by reading it.

Each test exercises the code our GPU users run (megatron-core's optimizer, scheduler,
schedule and layer specs), on CPU over gloo:

1. the transformer-engine layer spec is called with arguments its signature accepts;
2. megatron's no-decay groups (wd_mult=0) are honoured: biases and norm gains do not decay;
3. megatron's FP32Optimizer leaves param.grad aliased to main_grad: no gradient is counted twice;
4. with the distributed optimizer, and with --overlap-grad-reduce/--overlap-param-gather, DGA's
   specific gradient is whole on every rank and its domain probes stay local;
5. --dga-preconditioner adam reads megatron's optimizers' second moments (fp32 and bf16),
   and is refused, not ignored, with the distributed optimizer;
6. the gloo test ranks never see a GPU.
"""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.dist_utils import run_distributed, run_trainers
from tests.helpers.synthetic import TINY_GPT_ARGS, data_flags, run_argv

MODEL = TINY_GPT_ARGS


def _argv(shards, run_dir, extra=()):
    return run_argv(run_dir, extra, data=data_flags(shards), model=MODEL, iters=6)


def _trainer(argv):
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    cfg = parse_args(argv)
    return Trainer(cfg, platform.initialize(cfg.parallel))


# ----------------------------------------------------------------------------- 1. TE layer spec


def test_transformer_engine_spec_is_called_with_arguments_it_accepts(monkeypatch):
    """build_gpt_model's TE branch, with megatron-core's real signature checked at the call."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dga import model as model_mod

    real_te = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
    calls = []

    def checked_te_spec(*args, **kwargs):
        inspect.signature(real_te).bind(*args, **kwargs)  # TypeError on a wrong argument, as on a GPU
        calls.append(kwargs)
        # TE layers need transformer-engine and a GPU; the local spec stands in for the build.
        return gpt_layer_specs.get_gpt_layer_local_spec()

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", checked_te_spec)
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)

    def build(rank, world_size):
        from megatron_dga import platform

        platform.initialize(platform.ParallelConfig())
        cfg = model_mod.GPTModelConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64, normalization="RMSNorm"
        )
        model_mod.build_gpt_model(cfg)
        platform.shutdown()

    build(0, 1)
    assert calls == [{}]
    # And the local spec still gets the norm it builds (RMSNorm here).
    with pytest.raises(TypeError):
        inspect.signature(real_te).bind(normalization="RMSNorm")


# ----------------------------------------------------------------------------- 2. weight decay groups


def _decay_run(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dga import platform
    from megatron_dga.model import GPTModelConfig, build_stage_model
    from megatron_dga.training.config import OptimizerConfig, ScheduleConfig
    from megatron_dga.training.optim import Optimizer

    ctx = platform.initialize(platform.ParallelConfig())
    core, module = build_stage_model(
        GPTModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64), ctx
    )
    ddp = DistributedDataParallel(core.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    opt = Optimizer(
        ddp,
        OptimizerConfig(lr=0.1, min_lr=0.0, weight_decay=0.5, lr_decay_style="constant"),
        bf16=False,
        schedule=ScheduleConfig(train_iters=10),
    )
    before = {n: p.detach().clone() for n, p in core.named_parameters()}
    ddp.zero_grad_buffer()  # zero gradients: Adam's update is 0, only weight decay moves parameters
    opt.zero_grad()
    opt.step()
    out = {}
    for n, p in core.named_parameters():
        nonzero = before[n] != 0
        ratio = float((p.detach()[nonzero] / before[n][nonzero]).mean()) if nonzero.any() else 1.0
        out[n] = (before[n].ndim, ratio, bool(torch.equal(p.detach(), before[n])))
    platform.shutdown()
    return out


def test_biases_and_norm_gains_do_not_decay():
    ratios = run_distributed(_decay_run, world_size=1)[0]
    decayed = {n: r for n, (ndim, r, _) in ratios.items() if ndim > 1}
    kept = {n: same for n, (ndim, _, same) in ratios.items() if ndim <= 1}
    assert decayed and kept
    for name, ratio in decayed.items():  # AdamW: p <- p (1 - lr wd) = 0.95 p
        assert ratio == pytest.approx(0.95, rel=1e-6), name
    assert all(kept.values()), [n for n, same in kept.items() if not same]


# ----------------------------------------------------------------------------- 3. aliased grads


def _double_count_run(rank, world_size, argv):
    from megatron.core.optimizer import FP32Optimizer

    trainer = _trainer(argv)
    leaves = getattr(trainer.optimizer.inner, "chained_optimizers", [trainer.optimizer.inner])
    assert all(isinstance(leaf, FP32Optimizer) for leaf in leaves), [type(x) for x in leaves]
    trainer.train_step()  # megatron's FP32Optimizer.step leaves param.grad = main_grad
    batch = trainer.data.next_train_micro_batches()
    first = trainer.view.backward(batch, sync_grads=True)
    after_step = [g.clone() for g in trainer.view.grads()]
    second = trainer.view.backward(batch, sync_grads=True)
    again = [g.clone() for g in trainer.view.grads()]
    norm_step = trainer.optimizer.step()
    from megatron_dga import platform

    platform.shutdown()
    return ([a.numpy() for a in after_step], [b.numpy() for b in again], first.mean_loss, second.mean_loss, norm_step)


def test_no_gradient_counted_twice_after_a_megatron_optimizer_step(shards, tmp_path):
    after_step, again, loss1, loss2, norm = run_distributed(
        _double_count_run, world_size=1, args=(_argv(shards, tmp_path),)
    )[0]
    assert loss1 == loss2
    for a, b in zip(after_step, again):
        np.testing.assert_array_equal(a, b)
    expected = np.sqrt(sum(float((b.astype(np.float64) ** 2).sum()) for b in again))
    assert norm == pytest.approx(expected, rel=1e-5)  # megatron's grad norm of the same gradient


# ----------------------------------------------------------------------------- 4. distributed optimizer, overlap

# Small buckets (the tiny GPT has ~30k parameters): several buckets, each reduced (and with
# --overlap-param-gather gathered) on its own, as in a real model.
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "5000"]


def test_distributed_optimizer_and_overlap_give_the_same_alignments(shards, tmp_path):
    # The exact estimator; fd with the overlapped distributed optimizer: tests/training/test_config_matrix.py.
    dga = ["--mixing", "dga", "--dga-interval", "2"]
    variants = {
        "plain": [],
        "distopt": ["--use-distributed-optimizer"],
        "overlap": OVERLAP,
        "distopt_overlap": ["--use-distributed-optimizer", "--overlap-param-gather", *OVERLAP],
    }
    runs = run_trainers(
        {name: _argv(shards, tmp_path / name, dga + extra) for name, extra in variants.items()}, world_size=2
    )
    plain = runs["plain"]["metrics"]
    updates = [m for m in plain if "alignments" in m]
    assert len(updates) == 3
    for name, rtol in (("distopt", 1e-4), ("overlap", 1e-6), ("distopt_overlap", 1e-6)):
        other = runs[name]["metrics"]
        for a, b in zip(updates, [m for m in other if "alignments" in m]):
            np.testing.assert_allclose(b["alignments"], a["alignments"], rtol=rtol, atol=1e-9, err_msg=name)
            assert b["specific_grad_norm"] == pytest.approx(a["specific_grad_norm"], rel=max(rtol, 1e-6)), name
        np.testing.assert_allclose(
            [m["lm_loss"] for m in other], [m["lm_loss"] for m in plain], rtol=min(rtol, 1e-5), err_msg=name
        )
        np.testing.assert_allclose(other[-1]["domain_weights"], plain[-1]["domain_weights"], rtol=rtol, err_msg=name)
        # Every rank's parameters after train(): with --overlap-param-gather they are gathered
        # (each rank updated only its shard), so they match the plain run on every rank too.
        for rank, (got, ref) in enumerate(zip(runs[name]["params"], runs["plain"]["params"])):
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-9, err_msg=f"{name} rank {rank}")


# ----------------------------------------------------------------------------- 5. Adam preconditioner


def _adam_run(rank, world_size, argv):
    trainer = _trainer(argv)
    before = trainer.view.adam_preconditioner()
    trainer.train_step()
    after = trainer.view.adam_preconditioner()
    inner = trainer.optimizer.inner
    leaves = getattr(inner, "chained_optimizers", [inner])
    # megatron's own record of v: its optimizers' torch state, keyed by their main params.
    states = [s["exp_avg_sq"] for leaf in leaves for s in leaf.optimizer.state.values()]
    from megatron_dga import platform

    platform.shutdown()
    return {
        "before": before,
        "numels": [v.numel() for v in after["exp_avg_sq"]],
        "param_numels": [p.numel() for p in trainer.params],
        "dtypes": sorted({str(v.dtype) for v in after["exp_avg_sq"]}),
        "sum_v": sum(float(v.double().sum()) for v in after["exp_avg_sq"]),
        "sum_state": sum(float(v.double().sum()) for v in states),
        "bias_correction2": after["bias_correction2"],
    }


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_adam_preconditioner_reads_megatron_optimizer_state(shards, tmp_path, precision):
    argv = _argv(
        shards, tmp_path, ["--mixing", "dga", "--dga-preconditioner", "adam", "--adam-beta2", "0.95", *precision]
    )
    out = run_distributed(_adam_run, world_size=1, args=(argv,))[0]
    assert out["before"] is None  # identity before the first step, as documented
    assert out["numels"] == out["param_numels"]
    assert out["dtypes"] == ["torch.float32"]  # the fp32 master copies with --bf16
    assert out["sum_v"] > 0
    assert out["sum_v"] == pytest.approx(out["sum_state"], rel=1e-12)
    assert out["bias_correction2"] == pytest.approx(1 - 0.95)


def test_adam_preconditioner_with_distributed_optimizer_is_refused(shards, tmp_path):
    argv = _argv(shards, tmp_path, ["--mixing", "dga", "--dga-preconditioner", "adam", "--use-distributed-optimizer"])
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dga.pretrain_gpt", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--dga-preconditioner adam cannot be combined with --use-distributed-optimizer" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- 6. ranks hide GPUs


def _visible(rank, world_size):
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_gloo_test_ranks_see_no_gpu():
    assert run_distributed(_visible, world_size=2) == [("", False), ("", False)]


# ----------------------------------------------------------------------------- bf16 and fp16 on CPU


def test_bf16_and_fp16_train_with_megatron_mixed_precision_optimizers(shards, tmp_path):
    dga = ["--mixing", "dga", "--dga-interval", "2", "--train-iters", "12"]
    # fp16: dynamic loss scaling from 2^20, which overflows this model's fp16 gradients (so do 2^19):
    # megatron skips those steps and halves the scale each time (hysteresis 1) until they fit.
    runs = run_trainers(
        {
            "bf16": _argv(shards, tmp_path / "bf16", ["--bf16", *dga]),
            "fp16": _argv(
                shards, tmp_path / "fp16", ["--fp16", "--initial-loss-scale", str(2**20), "--hysteresis", "1", *dga]
            ),
        },
        world_size=2,
    )
    for precision in ("bf16", "fp16"):
        metrics = runs[precision]["metrics"]
        losses = np.array([m["lm_loss"] for m in metrics])
        assert np.isfinite(losses).all() and losses[-3:].mean() < losses[:3].mean() - 0.05, (precision, losses)
        assert len([m for m in metrics if "alignments" in m]) == 6
    fp16 = runs["fp16"]["metrics"]
    skipped = [m for m in fp16 if m["skipped_iterations"]]
    assert skipped and all("grad_norm" not in m for m in skipped)  # no grad norm for a skipped step
    scales = [2.0**20] + [m["loss_scale"] for m in fp16]
    for before, m in zip(scales, fp16):  # halved at each skipped step, kept otherwise
        assert m["loss_scale"] == (before / 2 if m["skipped_iterations"] else before), fp16
    # A skipped step leaves the LR schedule (and the weights) where they were.
    first_applied = next(i for i, m in enumerate(fp16) if not m["skipped_iterations"])
    assert fp16[first_applied]["lr"] == fp16[0]["lr"]
    # DGA's probes are unscaled, and a probe that overflows at the training loss scale is redone at
    # a smaller one: every update goes through, with true-gradient magnitudes.
    assert not any("dga_skipped_updates" in m for m in fp16)
    updates = [m for m in fp16 if "alignments" in m]
    assert all(np.isfinite(m["alignments"]).all() and 0.1 < m["specific_grad_norm"] < 10 for m in updates), updates


def test_adam_step_count_from_torch_state_or_fused_adam_group():
    """t for Adam's bias correction: torch's Adam keeps it per parameter, TE/apex FusedAdam per group
    (the GPU path; FusedAdam is absent on CPU, so its layout is stated here)."""
    import torch

    from megatron_dga.training.optim import adam_step

    assert adam_step({"step": torch.tensor(7.0), "exp_avg_sq": None}, None, "AdamW") == 7
    assert adam_step({"exp_avg_sq": None}, 12, "FusedAdam") == 12
    with pytest.raises(RuntimeError, match="FusedAdam keeps no Adam step count"):
        adam_step({"exp_avg_sq": None}, None, "FusedAdam")
