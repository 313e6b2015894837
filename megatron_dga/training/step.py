"""Forward/backward over micro-batches into megatron DDP's grad buffers.

Loss convention (Megatron's): each micro-batch contributes its masked token mean divided
by the number of micro-batches; DDP averages over data-parallel ranks. The same code
runs the training step, the DGA probes and evaluation, so their gradients and losses
are computed identically.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from megatron_dga.model import causal_attention_mask


@dataclass
class LossStats:
    """Sums over the micro-batches this rank processed.

    With pipeline parallelism every stage of a pipeline holds the same values: the last
    stage computes the losses and broadcasts them; token counts come from the loss masks,
    which every stage has.
    """

    loss_sum: float
    """Sum over micro-batches of their masked mean loss."""
    num_micro_batches: int
    tokens: int
    per_domain_loss_sum: Dict[int, float]
    """Per domain id: sum of masked token losses."""
    per_domain_tokens: Dict[int, int]

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.num_micro_batches, 1)


def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_losses(model, batch: Dict[str, torch.Tensor], device) -> torch.Tensor:
    """Per-token losses (b, s) of one micro-batch, times its loss mask.

    With more than one pipeline stage: a forward-only pass through the pipeline (a
    collective over the stages: every stage must call it), losses on every stage.
    """
    if _pipeline_stages(model) > 1:
        from megatron_dga.training.pipeline import forward_token_losses

        return forward_token_losses(model, [batch], device)[0]
    batch = _to_device(batch, device)
    tokens = batch["tokens"]
    mask = causal_attention_mask(tokens.shape[1], device)
    losses = model(tokens, batch["position_ids"], mask, labels=batch["labels"])
    return losses.float() * batch["loss_mask"].float()


def forward_backward(model, micro_batches: Sequence[Dict[str, torch.Tensor]], device, *, sync_grads: bool = True,
                     forward_only: bool = False) -> LossStats:
    """Accumulate gradients of the mean loss over ``micro_batches`` into main_grad.

    Args:
        model: the megatron DDP-wrapped model (its grad buffers receive the gradients).
        micro_batches: this rank's micro-batches of one step (dicts from the mixture dataset).
        device: where the model lives.
        sync_grads: all-reduce gradients over data-parallel ranks at the end (a training
            step, the specific gradient); False leaves each rank's local gradient in the
            buffers (the DGA domain probes: their dot products are reduced instead).
        forward_only: evaluation; no backward, no_grad.

    With more than one pipeline stage this runs the schedule in ``training/pipeline.py``
    (every stage calls it with the same micro-batches; the returned stats are identical
    on all stages).
    """
    if _pipeline_stages(model) > 1:
        from megatron_dga.training.pipeline import pipeline_forward_backward

        return pipeline_forward_backward(model, micro_batches, device, sync_grads=sync_grads,
                                         forward_only=forward_only)
    n = len(micro_batches)
    stats = LossStats(0.0, n, 0, {}, {})
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        no_sync = model.no_sync() if (not last or not sync_grads) and not forward_only else contextlib.nullcontext()
        grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
        with no_sync, grad_ctx:
            losses = token_losses(model, batch, device)
            mask = batch["loss_mask"].to(device).float()
            tokens = mask.sum().clamp(min=1.0)
            loss = losses.sum() / tokens
            if not forward_only:
                (loss / n).backward()
        _accumulate(stats, losses.detach(), mask, batch.get("domain_id"), float(loss.detach()), int(mask.sum()))
    if sync_grads and not forward_only:
        model.finish_grad_sync()
    return stats


def _pipeline_stages(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "pipeline_model_parallel_size", 1) or 1)


def _accumulate(stats: LossStats, losses, mask, domain_ids, micro_loss: float, tokens: int) -> None:
    stats.loss_sum += micro_loss
    stats.tokens += tokens
    if domain_ids is None:
        return
    per_seq_loss = losses.sum(dim=1).double().cpu().tolist()
    per_seq_tokens = mask.sum(dim=1).long().cpu().tolist()
    for d, l, t in zip(domain_ids.tolist(), per_seq_loss, per_seq_tokens):
        stats.per_domain_loss_sum[d] = stats.per_domain_loss_sum.get(d, 0.0) + l
        stats.per_domain_tokens[d] = stats.per_domain_tokens.get(d, 0) + t


def split_micro_batches(batch: Dict[str, torch.Tensor], micro_batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Split a collated batch along dim 0 into micro-batches."""
    size = len(batch["tokens"])
    return [
        {k: v[i:i + micro_batch_size] if torch.is_tensor(v) else v for k, v in batch.items()}
        for i in range(0, size, micro_batch_size)
    ]
