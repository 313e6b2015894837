"""DP=2 and TP=2 megatron-core GPT training steps match one process (gloo, CPU); so do a
Llama-style model, activation recomputation, and megatron-core's fp16 loss scaling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.dist_utils import run_distributed

SEQ, VOCAB, GLOBAL_BATCH, STEPS = 16, 256, 4, 2

MODELS = {
    "gpt": {},
    # Llama-style: 4 query heads sharing 2 key/value groups, SwiGLU, RMSNorm, no biases, RoPE theta 5e5.
    "llama": dict(
        group_query_attention=True,
        num_query_groups=2,
        swiglu=True,
        normalization="RMSNorm",
        disable_bias_linear=True,
        position_embedding_type="rope",
        rotary_base=500000,
    ),
}


def _model_config(name="gpt", **overrides):
    from megatron_dga.model import GPTModelConfig

    # vocab 256 with divisible_by 64 pads to 256 for TP=1 and TP=2 alike, so both
    # layouts draw the same CPU master weights.
    return GPTModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=SEQ,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=64,
        **{**MODELS[name], **overrides},
    )


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _full_tensor(param, tensor, tp_size):
    """All-gather a TP-split tensor along its partition dim; replicated tensors pass through.

    A parameter with ``partition_stride`` s (SwiGLU's fc1: each rank holds [gate_r; up_r]) is
    s interleaved splits: the full tensor is [gate_0; gate_1; up_0; up_1].
    """
    from megatron.core import parallel_state

    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([rank_chunks[s] for s in range(stride) for rank_chunks in chunks], dim=dim)


def _train(ctx, cfg):
    """STEPS AdamW steps of ``cfg`` on this rank's share of the batch: (losses, full grads per step)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dga import platform
    from megatron_dga.model import build_gpt_model, causal_attention_mask

    tp_size = ctx.tp_size
    model = build_gpt_model(cfg, tp_size=tp_size)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    tokens, labels = _batch()
    per_rank = GLOBAL_BATCH // ctx.dp_size
    sl = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
    tokens, labels = tokens[sl], labels[sl]
    positions = torch.arange(SEQ).expand_as(tokens)
    mask = causal_attention_mask(SEQ, "cpu")
    losses, grads = [], []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad(set_to_none=True)
        # Where the trainer runs forward and backward: inside megatron's schedule, in this block
        # (activation recomputation saves and restores megatron's RNG states).
        with platform.megatron_cuda_calls_on_cpu():
            loss = ddp(tokens, positions, mask, labels=labels).mean()
            loss.backward()
        ddp.finish_grad_sync()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss, group=_dp_group())
        losses.append(global_loss.item() / ctx.dp_size)
        named = {n: _full_tensor(p, p.main_grad, tp_size) for n, p in model.named_parameters()}
        grads.append({n: g.numpy().astype(np.float64) for n, g in named.items()})
        for p in ddp.parameters():
            p.grad = p.main_grad.clone()
        opt.step()
    return losses, grads, sum(p.numel() for p in model.parameters())


def _count_checkpointed_forwards(calls):
    """Count megatron's activation-checkpointed forwards (every recompute path runs one)."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    forward = CheckpointFunction.forward

    def counted(ctx, *args):
        calls.append(1)
        return forward(ctx, *args)

    CheckpointFunction.forward = staticmethod(counted)


def _train_steps(rank, world_size, tp_size, name):
    from megatron_dga import platform

    ctx = platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=tp_size, seed=7))
    cfg = _model_config(name)
    losses, grads, numel = _train(ctx, cfg)
    platform.shutdown()
    return losses, grads, (numel, cfg.num_parameters())


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


@pytest.fixture(scope="module")
def reference():
    """One-process runs, by model name (each computed once, on first use)."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = run_distributed(_train_steps, world_size=1, args=(1, name))[0]
        return runs[name]

    return get


@pytest.mark.parametrize("name, tp_size", [("gpt", 1), ("gpt", 2), ("llama", 2)], ids=["dp2", "tp2", "llama-tp2"])
def test_two_ranks_match_one_process(reference, name, tp_size):
    ref_losses, ref_grads, (numel, counted) = reference(name)
    assert numel == counted  # GPTModelConfig.num_parameters counts what megatron builds
    results = run_distributed(_train_steps, world_size=2, args=(tp_size, name))
    for losses, grads, _ in results:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for step in range(STEPS):
            assert grads[step].keys() == ref_grads[step].keys()
            for name_, ref in ref_grads[step].items():
                # Reduction order differs by layout (~3e-7 of a tensor's largest gradient at step 0);
                # AdamW's first, sign-like update makes near-zero entries differ more afterwards.
                atol = max(2e-6, 1e-4 * float(np.abs(ref).max()))
                np.testing.assert_allclose(
                    grads[step][name_], ref, rtol=1e-4, atol=atol, err_msg=f"step {step} {name_}"
                )
    # The loss after an optimizer step equals too, so the update itself matches.
    assert ref_losses[1] != ref_losses[0]


RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_activations=True),  # Megatron's shorthand: core attention only
}


def _recompute_runs(rank, world_size):
    from megatron_dga import platform

    ctx = platform.initialize(platform.ParallelConfig(seed=7))
    calls = []
    _count_checkpointed_forwards(calls)
    runs = {}
    for variant, flags in {"none": {}, **RECOMPUTE}.items():
        platform.set_seed(7, ctx)  # the same CPU master weights (and dropout masks) for every variant
        calls.clear()
        cfg = _model_config("llama", hidden_dropout=0.1, attention_dropout=0.1, **flags)
        runs[variant] = _train(ctx, cfg)[:2] + (len(calls),)
    platform.shutdown()
    return runs


def test_activation_recomputation_changes_nothing():
    """Recomputed forwards (dropout included: megatron restores the RNG state) give bit-identical
    losses and gradients on CPU."""
    runs = run_distributed(_recompute_runs, world_size=1)[0]
    ref_losses, ref_grads, none_calls = runs.pop("none")
    assert none_calls == 0
    # Checkpointed forwards over STEPS steps of 2 layers: uniform chunks of 1 layer and selective
    # (each layer's core attention) 2 per step; block recomputes the first layer only.
    assert {variant: calls for variant, (_, _, calls) in runs.items()} == {
        "full-uniform": 2 * STEPS,
        "full-block": STEPS,
        "selective": 2 * STEPS,
    }
    for variant, (losses, grads, _) in runs.items():
        assert losses == ref_losses, variant
        for step in range(STEPS):
            for name, ref in ref_grads[step].items():
                np.testing.assert_array_equal(grads[step][name], ref, err_msg=f"{variant} step {step} {name}")


def _fp16_runs(rank, world_size):
    """Three steps through the trainer's schedule with megatron-core's optimizer: fp32, fp16 with a
    static loss scale, and fp16 whose dynamic scale overflows at first (that step is skipped)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_dga import platform
    from megatron_dga.model import build_stage_model
    from megatron_dga.training.config import OptimizerConfig
    from megatron_dga.training.optim import megatron_optimizer_config
    from megatron_dga.training.step import forward_backward

    ctx = platform.initialize(platform.ParallelConfig(seed=7))
    tokens, labels = _batch()
    batch = [
        {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
            "position_ids": torch.arange(SEQ).expand_as(tokens),
        }
    ]
    runs = {}
    for variant, fp16, flags in (
        ("fp32", False, {}),
        ("static", True, dict(loss_scale=1024.0)),
        ("dynamic", True, dict(initial_loss_scale=2.0**40, hysteresis=1)),
    ):
        platform.set_seed(7, ctx)
        core, module = build_stage_model(_model_config("llama", fp16=fp16), ctx)
        ddp = DistributedDataParallel(core.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
        cfg = OptimizerConfig(lr=1e-2, min_lr=0.0, **flags)
        with platform.megatron_cuda_calls_on_cpu():
            opt = get_megatron_optimizer(megatron_optimizer_config(cfg, bf16=False, fp16=fp16), [ddp])
        # Megatron's setup_model_and_optimizer: the schedule scales each loss by the current loss scale.
        core.config.grad_scale_func = opt.scale_loss if fp16 else None
        steps = []
        for _ in range(3):
            with platform.megatron_cuda_calls_on_cpu():
                ddp.zero_grad_buffer()
                opt.zero_grad()
            loss = forward_backward(ddp, batch, ctx.device).mean_loss
            with platform.megatron_cuda_calls_on_cpu():
                ok, _, _ = opt.step()
            steps.append((loss, bool(ok), float(opt.get_loss_scale())))
        runs[variant] = (type(module).__name__, [type(o).__name__ for o in opt.chained_optimizers], steps)
    platform.shutdown()
    return runs


def test_fp16_loss_scaling_runs_on_cpu():
    runs = run_distributed(_fp16_runs, world_size=1)[0]
    fp32 = [loss for loss, _, _ in runs["fp32"][2]]
    module, optimizers, static = runs["static"]
    assert (module, optimizers) == ("Float16Module", ["Float16OptimizerWithFloat16Params"])
    assert [(ok, scale) for _, ok, scale in static] == [(True, 1024.0)] * 3
    np.testing.assert_allclose([loss for loss, _, _ in static], fp32, rtol=2e-3)
    # 2^40 overflows fp16 gradients: megatron skips the step and halves the scale (hysteresis 1),
    # and keeps halving until the gradients fit; the weights stay put meanwhile.
    dynamic = runs["dynamic"][2]
    assert [(ok, scale) for _, ok, scale in dynamic[:2]] == [(False, 2.0**39), (False, 2.0**38)]
    assert dynamic[1][0] == dynamic[0][0] == pytest.approx(fp32[0], rel=2e-3)


def _per_token_loss(rank, world_size):
    from megatron_dga import platform
    from megatron_dga.model import build_gpt_model, causal_attention_mask

    platform.initialize(platform.ParallelConfig(seed=3))
    model = build_gpt_model(_model_config())
    tokens, labels = _batch()
    positions = torch.arange(SEQ).expand_as(tokens)
    mask = causal_attention_mask(SEQ, "cpu")
    with torch.no_grad():
        loss = model(tokens, positions, mask, labels=labels)
        logits = model(tokens, positions, mask)
    platform.shutdown()
    ref = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB).double(), labels.reshape(-1), reduction="none")
    return loss.double().reshape(-1).numpy(), ref.numpy()


def test_megatron_loss_equals_cross_entropy():
    loss, ref = run_distributed(_per_token_loss, world_size=1)[0]
    # Padded vocab entries exist in the logits; with VOCAB == padded size there are none.
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
