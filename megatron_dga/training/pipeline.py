"""Pipeline-parallel forward/backward: a GPipe schedule over torch.distributed send/recv.

megatron-core's own schedules (``get_forward_backward_func``) allocate on CUDA and call
``torch.cuda.synchronize``, so they cannot run in our CPU CI. This module is the small
replacement, used by :func:`megatron_dga.training.step.forward_backward` whenever the
model is split over more than one pipeline stage (on CPU over gloo and on GPU over NCCL).

Schedule (GPipe)::

    stage 0:  F0 F1 .. Fn-1 ...................... Bn-1 .. B1 B0
    stage 1:     F0 F1 .. Fn-1 ............ Bn-1 .. B1 B0
    last:           F0 F1 .. Fn-1 Bn-1 .. B1 B0

All forwards of the micro-batches in order, then all backwards in reverse order. A
non-first stage receives the previous stage's hidden states ([s, b, h], full on every
tensor-parallel rank since sequence parallelism is off) and feeds them in with
megatron's ``set_input_tensor``; a non-last stage sends its output hidden states on
and, in the backward, receives their gradient. Sends are non-blocking, receives block:
activations flow one way per phase, so no cycle can deadlock. GPipe keeps the
activations of all micro-batches of a step alive at once (1F1B would bound that to the
pipeline depth; not needed at the sizes this project trains).

The losses exist only on the last stage; :func:`pipeline_forward_backward` broadcasts
them over the pipeline group so that the returned :class:`LossStats` is identical on
every stage (see its docstring), which is what the trainer's logging/eval and the DGA
alignment reductions (which add loss sums and sample counts over all ranks) rely on.

Tied embeddings: with more than one stage the last stage holds a copy of the word
embedding (megatron marks it ``shared``) that megatron initialises from the first stage
at construction. After every backward the two copies' gradients are all-reduced over
megatron's embedding group, so both hold the full gradient, updates stay identical, and
counting the ``shared`` copy out (``optim.counted_params``) counts the weight once.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dga import platform
from megatron_dga.errors import ConfigError
from megatron_dga.model import GPTModelConfig, build_gpt_model, causal_attention_mask
from megatron_dga.training.step import LossStats, _accumulate, _pipeline_stages, _to_device


def unwrap(model):
    """The megatron GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_stage_model(cfg: GPTModelConfig, ctx):
    """This rank's pipeline stage of the GPT (its TP slice), embedding copies synchronised.

    Args:
        cfg: model shape.
        ctx: the ``platform.ParallelContext`` (tp/pp sizes, this rank's stage).

    With one stage this is exactly ``build_gpt_model(cfg, tp, 1)``.
    """
    if ctx.pp_size == 1:
        return build_gpt_model(cfg, ctx.tp_size, ctx.pp_size)
    # GPTModelConfig.check_parallel (inside build_gpt_model) rejects layers not divisible by stages.
    with platform.tensor_cuda_is_identity_on_cpu():
        model = build_gpt_model(cfg, ctx.tp_size, ctx.pp_size, pre_process=ctx.is_first_stage,
                                post_process=ctx.is_last_stage)
    if model.config.sequence_parallel:
        raise ConfigError("pipeline parallelism with sequence parallelism is not supported; turn sequence parallel off")
    return model


def global_parameter_names(model) -> Dict[str, torch.nn.Parameter]:
    """This stage's parameters under the names they have in the unsplit (one-stage) model.

    Megatron numbers a stage's layers from 0 in its module names; the global index comes
    from each layer's ``layer_number`` (1-based, offset by the stage). The last stage's
    tied copy of the word embedding (``output_layer.weight`` marked ``shared``) is left
    out: the first stage owns ``embedding.word_embeddings.weight``.
    """
    core = unwrap(model)
    layers = getattr(getattr(core, "decoder", None), "layers", [])
    offsets = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}." for i, layer in enumerate(layers)}
    named = {}
    for name, param in core.named_parameters():
        if getattr(param, "shared", False):
            continue
        parts = name.split(".")
        if name.startswith("decoder.layers.") and len(parts) > 2:
            prefix = ".".join(parts[:3]) + "."
            name = offsets[prefix] + name[len(prefix):]
        named[name] = param
    return named


class _Stage:
    """This rank's place in its pipeline: neighbours (global ranks) and the group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.group = ps.get_pipeline_model_parallel_group()
        self.is_first = ps.is_pipeline_first_stage()
        self.is_last = ps.is_pipeline_last_stage()
        self.prev = ps.get_pipeline_model_parallel_prev_rank()
        self.next = ps.get_pipeline_model_parallel_next_rank()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()


def _send(tensor: torch.Tensor, dst: int, stage: _Stage, pending: list) -> None:
    """Non-blocking send; the tensor is kept with its request until the request is waited on."""
    tensor = tensor.contiguous()
    pending.append((dist.isend(tensor, dst=dst, group=stage.group), tensor))


def _run_forward(model, core, stage: _Stage, micro_batches, device, forward_only: bool, pending: list):
    """All forwards. Returns per micro-batch (input tensor, output or per-token losses, batch)."""
    config = core.config
    records = []
    for batch in micro_batches:
        batch = _to_device(batch, device)
        tokens = batch["tokens"]
        input_tensor = None
        if not stage.is_first:
            # [s, b, h]: megatron's hidden-state layout between stages.
            input_tensor = torch.empty((tokens.shape[1], tokens.shape[0], config.hidden_size),
                                       dtype=config.pipeline_dtype, device=device)
            dist.recv(input_tensor, src=stage.prev, group=stage.group)
            input_tensor.requires_grad_(not forward_only)
        core.set_input_tensor(input_tensor)
        mask = causal_attention_mask(tokens.shape[1], device)
        labels = batch["labels"] if stage.is_last else None
        output = model(tokens, batch["position_ids"], mask, labels=labels)
        if stage.is_last:
            output = output.float() * batch["loss_mask"].float()  # per-token losses (b, s)
        else:
            _send(output.detach(), stage.next, stage, pending)
        records.append((input_tensor, output, batch))
    core.set_input_tensor(None)
    return records


def _run_backward(model, stage: _Stage, records, sync_grads: bool, pending: list) -> None:
    """All backwards in reverse order; the last one (micro-batch 0) may trigger DDP's reduction."""
    n = len(records)
    for i in reversed(range(n)):
        input_tensor, output, batch = records[i]
        final = i == 0
        no_sync = model.no_sync() if (not final or not sync_grads) else contextlib.nullcontext()
        with no_sync:
            if stage.is_last:
                mask = batch["loss_mask"].float()
                # Same loss as the one-stage path: masked token mean / number of micro-batches.
                (output.sum() / mask.sum().clamp(min=1.0) / n).backward()
            else:
                grad = torch.empty_like(output)
                dist.recv(grad, src=stage.next, group=stage.group)
                torch.autograd.backward(output, grad_tensors=grad)
        if input_tensor is not None:
            _send(input_tensor.grad, stage.prev, stage, pending)
        records[i] = None  # free this micro-batch's activations


def allreduce_tied_embedding_grads(model) -> None:
    """Sum the word-embedding gradients of the first and last stage (tied weights).

    Both copies then hold the gradient of the one shared weight; the optimizer updates
    them identically. No-op with untied weights or a single stage.
    """
    from megatron.core import parallel_state as ps

    core = unwrap(model)
    if not core.share_embeddings_and_output_weights or _pipeline_stages(core) == 1:
        return
    if not ps.is_rank_in_embedding_group(ignore_virtual=True):
        return
    weight = core.shared_embedding_or_output_weight()
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        grad = weight.grad
    if grad is not None:
        dist.all_reduce(grad, group=ps.get_embedding_group())


def pipeline_forward_backward(model, micro_batches: Sequence[Dict[str, torch.Tensor]], device, *,
                              sync_grads: bool = True, forward_only: bool = False,
                              token_losses_out: Optional[List[torch.Tensor]] = None) -> LossStats:
    """GPipe forward/backward of this stage over ``micro_batches`` (every stage passes the same ones).

    Gradients land in the DDP grad buffers exactly as in the one-stage path (mean loss
    per micro-batch / number of micro-batches), then (training) the tied-embedding
    gradients are all-reduced over the embedding group; with ``sync_grads`` DDP's
    data-parallel reduction runs first.

    Args:
        model: the DDP-wrapped stage model.
        micro_batches: this data-parallel rank's micro-batches (identical on all stages).
        device: where the model lives.
        sync_grads: all-reduce over data-parallel ranks (see step.forward_backward).
        forward_only: evaluation; no backward, no_grad.
        token_losses_out: if a list, receives each micro-batch's per-token losses (b, s)
            (times the loss mask), on every stage.

    Returns:
        LossStats, identical on every stage of the pipeline: the last stage computes the
        loss values and broadcasts them; token counts come from each stage's own copy of
        the loss masks.
    """
    core = unwrap(model)
    stage = _Stage()
    pending: list = []
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    with grad_ctx:
        records = _run_forward(model, core, stage, micro_batches, device, forward_only, pending)
    losses = [out.detach() for _, out, _ in records] if stage.is_last else None
    masks = [batch["loss_mask"].float() for _, _, batch in records]
    domain_ids = [batch.get("domain_id") for _, _, batch in records]
    if not forward_only:
        _run_backward(model, stage, records, sync_grads, pending)
    for work, _ in pending:
        work.wait()
    del records
    if not forward_only:
        if sync_grads:
            model.finish_grad_sync()
        allreduce_tied_embedding_grads(model)
    return _broadcast_stats(stage, losses, masks, domain_ids, device, token_losses_out)


def _broadcast_stats(stage: _Stage, losses, masks, domain_ids, device, token_losses_out) -> LossStats:
    """LossStats from the last stage's losses, the same on every stage."""
    n = len(masks)
    if token_losses_out is not None:
        # Forward-only callers (the finite-difference DGA estimator) need every token's loss.
        for i, mask in enumerate(masks):
            t = losses[i].contiguous() if stage.is_last else torch.empty(mask.shape, dtype=torch.float32, device=device)
            dist.broadcast(t, src=stage.last_rank, group=stage.group)
            token_losses_out.append(t)
        losses = token_losses_out
    elif not stage.is_last:
        losses = [torch.zeros_like(mask) for mask in masks]
    stats = LossStats(0.0, n, 0, {}, {})
    for l, mask, ids in zip(losses, masks, domain_ids):
        tokens = mask.sum()
        _accumulate(stats, l, mask, ids, float(l.sum() / tokens.clamp(min=1.0)), int(tokens))
    if token_losses_out is not None:
        return stats  # every stage summed the same broadcast losses
    # One float64 broadcast: the loss sum and the per-domain sums (the domain ids, and so
    # the keys' order, are the same on every stage).
    keys = sorted(stats.per_domain_loss_sum)
    t = torch.tensor([stats.loss_sum] + [stats.per_domain_loss_sum[k] for k in keys], dtype=torch.float64,
                     device=device)
    dist.broadcast(t, src=stage.last_rank, group=stage.group)
    values = t.tolist()
    stats.loss_sum = values[0]
    stats.per_domain_loss_sum = dict(zip(keys, values[1:]))
    return stats


def forward_token_losses(model, micro_batches: Sequence[Dict[str, torch.Tensor]], device) -> List[torch.Tensor]:
    """Per-token losses (b, s) times the loss mask of each micro-batch, on every stage; no grad."""
    out: List[torch.Tensor] = []
    with torch.no_grad():
        pipeline_forward_backward(model, micro_batches, device, forward_only=True, token_losses_out=out)
    return out
