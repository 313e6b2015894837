"""Forward/backward over micro-batches through megatron-core's pipeline schedules.

Every forward/backward of the job (training steps, DGA probes, evaluation, the
finite-difference forwards) goes through megatron-core's ``get_forward_backward_func``:
the no-pipelining schedule with one stage, 1F1B with several, the interleaved 1F1B schedule
with virtual pipeline stages (each rank passes its list of model chunks). On CPU the schedule runs
over gloo inside ``platform.megatron_cuda_calls_on_cpu`` (it hard-codes a few CUDA
allocations); on GPU it runs untouched. So the schedule CI tests is the one GPUs run.

Loss convention (Megatron's): each micro-batch contributes its masked token mean; the
schedule divides it by the number of micro-batches; DDP averages over data-parallel
ranks. Gradient synchronisation is megatron-core's ``finalize_model_grads`` (DP
all-reduce, or reduce-scatter with the distributed optimizer; tied-embedding all-reduce
over the first and last stage). DGA's domain probes skip the data-parallel part and
keep only the tied-embedding all-reduce (``sync_grads=False``).

The schedule hooks are set as Megatron's ``train()`` sets them: ``no_sync_func`` (DDP's
``no_sync``: only the last micro-batch's backward may start the reduction), with
--overlap-grad-reduce ``grad_sync_func`` (DDP's ``start_grad_sync``, which 1F1B calls on the
stages that reduce in the pipeline bubble; not for DGA's specific gradient, which must be all-reduced,
see ``_call_settings``), and the fp16 loss scale through the model
config's ``grad_scale_func`` (set once by the trainer). With --overlap-grad-reduce DDP's
backward hooks start each bucket's reduction themselves, outside ``finalize_model_grads``,
so a probe that must keep its local gradients runs entirely inside ``no_sync``. With model
chunks the hooks are per chunk (``no_sync`` enters every chunk's).

The interleaved schedule runs a step's micro-batches in groups of PP per virtual stage
(megatron's ``microbatch_group_size_per_vp_stage``): training steps must bring a multiple
of PP (``check_interleaved_micro_batches``, at start-up); a DGA probe or evaluation call of
another size gets the smallest group megatron accepts (``microbatch_group_size``), and one
of fewer than PP micro-batches is padded with micro-batches whose loss mask is all zero.

Losses stay on the device during the schedule and reach the host once per call: one
broadcast from the last pipeline stage (when there are several), one copy.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from megatron_dga import comm, platform
from megatron_dga.model import causal_attention_mask, unwrap


@dataclass
class LossStats:
    """Sums over the micro-batches this rank processed, identical on every stage of its pipeline."""

    loss_sum: float
    """Sum over micro-batches of their masked mean loss."""
    num_micro_batches: int
    tokens: int
    token_loss_sum: float
    """Sum of all masked token losses (token_loss_sum / tokens is the token-weighted mean)."""
    per_domain_loss_sum: Dict[int, float]
    """Per domain id: sum of masked token losses."""
    per_domain_tokens: Dict[int, int]
    token_losses: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    """Per micro-batch masked per-token losses (b, s), when asked for (``keep_token_losses``)."""

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.num_micro_batches, 1)


@dataclass
class StepLoss:
    """A training step's loss, kept on the device: no host read until it is logged.

    ``forward_backward(..., host_stats=False)`` returns it; the same sum as ``LossStats.loss_sum``
    (each micro-batch's masked mean in float64), identical on every stage of the pipeline.
    """

    loss_sum: torch.Tensor
    """One float64 element on the device: the sum over micro-batches of their masked mean loss."""
    num_micro_batches: int
    domain_sums: Optional[torch.Tensor] = None
    """With ``num_domains``: (2, k) float64 on the device, per domain the sum of masked token losses and
    the token count of this rank's micro-batches, on the last pipeline stage (zeros on the others)."""

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(self.num_micro_batches, 1)


def _to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _pipeline_stages(config) -> int:
    return int(getattr(config, "pipeline_model_parallel_size", 1) or 1)


def _finalize_without_data_parallel(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """finalize_model_grads minus the data-parallel reduction (the DGA domain probes).

    Each rank keeps its local gradient; what megatron sums over the model-parallel ranks is still
    summed: with --sequence-parallel the norm gradients over the tensor-parallel group (each rank
    holds its slice of the sequence's partial sum; ``optim.counted_params`` counts them on TP rank
    0 only), and the tied word-embedding copies of the first and last pipeline stage, so the stage
    that owns the weight holds its whole gradient (the last stage's copy is counted out).
    """
    del num_tokens, pg_collection, force_all_reduce
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads,
        _allreduce_word_embedding_grads,
    )

    config = unwrap(model[0]).config
    _allreduce_non_tensor_model_parallel_grads(model, config, parallel_state.get_tensor_model_parallel_group())
    _allreduce_word_embedding_grads(model, config)


@contextlib.contextmanager
def _schedule_settings(config, **values):
    """Set attributes megatron reads (TransformerConfig fields of the schedule, DDP's), for one call."""
    saved = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def forward_backward(
    model,
    micro_batches: Sequence[Dict[str, torch.Tensor]],
    device,
    *,
    sync_grads: bool = True,
    force_all_reduce: bool = False,
    forward_only: bool = False,
    keep_token_losses: bool = False,
    host_stats: bool = True,
    num_domains: Optional[int] = None,
    after_backward: Optional[Callable[[int, int, Dict[str, torch.Tensor], int], None]] = None,
):
    """Accumulate gradients of the mean loss over ``micro_batches`` into main_grad.

    Args:
        model: the megatron DDP-wrapped model (its grad buffers receive the gradients), or the list of
            this rank's DDP-wrapped model chunks (virtual pipeline stages: the interleaved schedule).
        micro_batches: this rank's micro-batches of one step (dicts from the mixture dataset);
            every pipeline stage passes the same ones.
        device: where the model lives.
        sync_grads: reduce gradients over data-parallel ranks at the end (a training step, the
            specific gradient); False leaves each rank's local gradient in the buffers (the DGA
            domain probes: their dot products are reduced instead).
        force_all_reduce: with the distributed optimizer, all-reduce instead of reduce-scatter,
            so every rank holds the whole reduced gradient (DGA's specific gradient g_spe).
        forward_only: evaluation; no backward, no_grad.
        keep_token_losses: also return every micro-batch's per-token losses (on every stage).
        host_stats: False for training steps: return a :class:`StepLoss` that stays on the device
            (a host read per step would wait for the whole step; the trainer reads it when it logs).
        num_domains: with ``host_stats=False``, also sum the token losses and counts per domain id
            (``StepLoss.domain_sums``; for strategies rewarded by training losses, e.g. ODM).
        after_backward: ``fn(i, n, micro_batch, chunk)``, called on every stage right after micro-batch
            ``i`` of ``n`` has accumulated its gradient (divided by ``n``, the schedule's loss convention) into
            model chunk ``chunk``'s buffers, before any reduction of them: megatron's schedules call their
            module's ``backward_step`` once per micro-batch and chunk, and it is wrapped for this call
            (:func:`_reporting_backwards`). With --overlap-grad-reduce and one chunk the last micro-batch's
            backward starts the reduction, so it is not reported (DGA's in-step estimator); with virtual
            stages each chunk's reduction starts after its last backward, and other chunks' buffers may
            then be reducing: read only ``chunk``'s.

    Returns:
        LossStats (or StepLoss), identical on every stage of the pipeline.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    n = len(micro_batches)
    domain_sums = (
        None if host_stats or num_domains is None else torch.zeros(2, num_domains, dtype=torch.float64, device=device)
    )
    if n == 0:
        if not host_stats:
            return StepLoss(torch.zeros(1, dtype=torch.float64, device=device), 0, domain_sums)
        return LossStats(0.0, 0, 0, 0.0, {}, {}, [] if keep_token_losses else None)
    config = unwrap(chunks[0]).config  # shared by the chunks (model.build_model_chunks)
    sizes = {len(mb["tokens"]) for mb in micro_batches}
    seq_length = int(micro_batches[0]["tokens"].shape[1])
    scheduled = _pad_for_interleaving(list(micro_batches), len(chunks), _pipeline_stages(config))
    # The schedule divides each loss by len(scheduled); padding must not shrink the real ones.
    loss_factor = len(scheduled) / n
    collected: List[torch.Tensor] = []  # last stage: masked per-token losses, on the device
    means: List[torch.Tensor] = []  # last stage, host_stats=False: each micro-batch's masked mean (float64)

    def loss_func(loss_mask: torch.Tensor, padding: bool, domain_ids, output_tensor: torch.Tensor):
        losses = output_tensor.float() * loss_mask
        if not padding:
            if host_stats:
                collected.append(losses.detach())
            else:
                means.append(losses.detach().double().sum() / loss_mask.double().sum().clamp(min=1.0))
            if domain_sums is not None:
                if domain_ids is None:
                    raise ValueError("per-domain training losses need micro-batches with a 'domain_id'")
                domain_sums[0].index_add_(0, domain_ids, losses.detach().double().sum(dim=1))
                domain_sums[1].index_add_(0, domain_ids, loss_mask.double().sum(dim=1))
        loss = losses.sum() / loss_mask.sum().clamp(min=1.0)
        return (loss * loss_factor if loss_factor != 1 else loss), {}

    mask = attention_mask(seq_length, device)

    def forward_step(data_iterator: Iterator, stage_model):
        batch = _to_device(next(data_iterator), device)
        output = stage_model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, functools.partial(
            loss_func, batch["loss_mask"].float(), batch.get(_PADDING, False), batch.get("domain_id")
        )

    schedule = get_forward_backward_func()
    grad_ctx = torch.no_grad() if forward_only else contextlib.nullcontext()
    local_grads = _no_sync_func(chunks)() if not (sync_grads or forward_only) else contextlib.nullcontext()
    settings = _call_settings(
        chunks, config, sync_grads, len(scheduled), variable=len(sizes) > 1, force_all_reduce=force_all_reduce
    )
    if after_backward is not None and len(chunks) > 1 and chunks[0].ddp_config.overlap_grad_reduce:
        assert settings.get("grad_sync_func") is not None, "the interleaved schedule's reductions need grad_sync_func"
    reporting = (
        _reporting_backwards(after_backward, chunks, config, scheduled, n)
        if after_backward
        else contextlib.nullcontext()
    )
    # DDP's backward hooks start the overlapped reductions with DDP's own force_all_reduce,
    # not the schedule's argument (which reaches finalize_model_grads only).
    ddp_settings = contextlib.ExitStack()
    for chunk in chunks:
        ddp_settings.enter_context(_schedule_settings(chunk, force_all_reduce=bool(force_all_reduce and sync_grads)))
    with (
        _schedule_settings(config, **settings),
        ddp_settings,
        local_grads,
        platform.megatron_cuda_calls_on_cpu(),
        grad_ctx,
        reporting,
    ):
        schedule(
            forward_step_func=forward_step,
            # The interleaved schedule draws each chunk's micro-batches from its own iterator.
            data_iterator=[iter(scheduled) for _ in chunks] if len(chunks) > 1 else iter(scheduled),
            model=chunks,
            num_microbatches=len(scheduled),
            seq_length=seq_length,
            micro_batch_size=max(sizes),
            forward_only=forward_only,
            force_all_reduce=force_all_reduce,
        )
    if not host_stats:
        total = torch.stack(means).sum().reshape(1) if means else None
        return StepLoss(_from_last_stage(total, (1,), torch.float64, config, device), n, domain_sums)
    return _stats(collected, micro_batches, config, device, keep_token_losses)


@contextlib.contextmanager
def _reporting_backwards(after_backward, chunks, config, micro_batches, real_count: int):
    """megatron's schedules' ``backward_step`` followed by ``after_backward`` (see :func:`forward_backward`),
    for one schedule call. The k-th backward on a stage is known: micro-batch k's in the no-pipelining and
    1F1B schedules; with model chunks, entry k of megatron's own schedule table (the interleaved schedule
    runs backward k on the chunks in reverse, each chunk's micro-batches in order). The count is checked
    at the end; padding micro-batches (added for interleaving) are not reported."""
    from megatron.core.pipeline_parallel import schedules

    n = len(micro_batches)
    if len(chunks) == 1:
        order = [(i, 0) for i in range(n)]
    else:
        table = schedules.get_schedule_table(n, len(chunks), config.microbatch_group_size_per_vp_stage)
        order = [(i, len(chunks) - 1 - chunk) for i, chunk in table]
    # With --overlap-grad-reduce the single-chunk schedules let the last backward's hooks start reducing
    # the buffers. The interleaved one runs every backward with grad sync off and starts each chunk's
    # reduction through the training call's grad_sync_func after that chunk's last backward.
    skip_last = chunks[0].ddp_config.overlap_grad_reduce and len(chunks) == 1
    real = schedules.backward_step
    done = [0]

    def backward_step(*args, **kwargs):
        grad = real(*args, **kwargs)
        k = done[0]
        done[0] += 1
        i, chunk = order[k]
        if not (skip_last and k == n - 1) and not micro_batches[i].get(_PADDING, False):
            after_backward(i, real_count, micro_batches[i], chunk)
        return grad

    schedules.backward_step = backward_step
    try:
        yield
    finally:
        schedules.backward_step = real
    if done[0] != len(order):
        raise RuntimeError(
            f"megatron's schedule ran {done[0]} backward steps for {len(order)} (micro-batch, chunk) pairs"
        )


def attention_mask(seq_length: int, device) -> Optional[torch.Tensor]:
    """The attention mask a forward passes: None on a GPU (transformer-engine and megatron-core's local
    attention apply the causal mask type themselves: no s x s tensor, 1 GB at s = 32k), the explicit
    causal mask on CPU (megatron-core would build its default one on "cuda")."""
    return None if torch.device(device).type == "cuda" else causal_attention_mask(seq_length, device)


def _call_settings(
    chunks, config, sync_grads: bool, num_micro_batches: int, variable: bool, force_all_reduce: bool = False
) -> dict:
    """The TransformerConfig hooks one schedule call runs with (Megatron's ``train()`` sets the same).

    With --overlap-grad-reduce a training step gets megatron's ``grad_sync_func`` (DDP's
    ``start_grad_sync``: the pipeline stages past the first reduce in the bubble). A call that must
    all-reduce (``force_all_reduce``: DGA's specific gradient) gets none: ``start_grad_sync`` takes no
    ``force_all_reduce`` and would reduce-scatter with the distributed optimizer, leaving each rank
    only its shard of g_spe. Without it the schedules re-enable DDP's backward hooks for the last
    micro-batch, and the hooks reduce with DDP's ``force_all_reduce`` attribute (forward_backward
    sets it), as ``finalize_model_grads(force_all_reduce=True)`` expects.
    """
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    interleaved = len(chunks) > 1
    overlap = chunks[0].ddp_config.overlap_grad_reduce
    grad_sync = [chunk.start_grad_sync for chunk in chunks] if overlap and sync_grads and not force_all_reduce else None
    settings = dict(
        # A probe keeping local gradients holds no_sync for the whole call (forward_backward): a nested
        # no_sync would re-enable the reduction on exit, before the last micro-batch.
        no_sync_func=_no_sync_func(chunks) if sync_grads else contextlib.nullcontext,
        finalize_model_grads_func=finalize_model_grads if sync_grads else _finalize_without_data_parallel,
        # Megatron's train() with --overlap-grad-reduce (and its default --align-grad-reduce): one per chunk.
        grad_sync_func=grad_sync if interleaved or grad_sync is None else grad_sync[0],
        # Only the interleaved schedule reads it; Megatron leaves it unset without --align-param-gather:
        # the forward pre-hooks gather the parameters.
        param_sync_func=None,
        # Probe shares and eval tails can be smaller than --micro-batch-size: let the
        # pipeline send shapes first when the sizes in this call differ.
        variable_seq_lengths=variable and _pipeline_stages(config) > 1,
    )
    if interleaved:
        settings["microbatch_group_size_per_vp_stage"] = microbatch_group_size(
            num_micro_batches, _pipeline_stages(config)
        )
    return settings


def _no_sync_func(chunks):
    """DDP's ``no_sync`` over every chunk at once (the interleaved schedule enters and leaves them together)."""
    if len(chunks) == 1:
        return chunks[0].no_sync

    def no_sync_all():
        stack = contextlib.ExitStack()
        for chunk in chunks:
            stack.enter_context(chunk.no_sync())
        return stack

    return no_sync_all


_PADDING = "_padding"
"""Key marking a micro-batch added only to fill the interleaved schedule (no loss, no gradient)."""


def microbatch_group_size(num_micro_batches: int, pp_size: int) -> int:
    """Micro-batches each virtual stage runs in a row (megatron's ``microbatch_group_size_per_vp_stage``).

    megatron-core's interleaved schedule needs a group size in [PP, M] whose remainder M % group is 0
    or at least PP. Megatron's default, PP (depth-first, least activation memory), fits when M is a
    multiple of PP, which training steps are (``check_interleaved_micro_batches``); DGA probes and
    evaluation calls of other sizes get the smallest group that fits (M itself at worst).
    """
    for group in range(pp_size, num_micro_batches + 1):
        remainder = num_micro_batches % group
        if remainder == 0 or remainder >= pp_size:
            return group
    raise ValueError(f"{num_micro_batches} micro-batches cannot fill an interleaved pipeline of {pp_size} stages")


def _pad_for_interleaving(micro_batches: List[Dict[str, torch.Tensor]], num_chunks: int, pp_size: int):
    """Fill a call of fewer than PP micro-batches up to PP for the interleaved schedule (which needs PP).

    The added micro-batches repeat the last one with an all-zero loss mask: they contribute neither
    loss nor gradient (forward_backward rescales the real losses for the larger count). Only small
    probe and evaluation calls need it; training steps are checked to be multiples of PP.
    """
    missing = pp_size - len(micro_batches)
    if num_chunks == 1 or missing <= 0:
        return micro_batches
    last = micro_batches[-1]
    filler = {**last, "loss_mask": torch.zeros_like(last["loss_mask"]), _PADDING: True}
    return micro_batches + [filler] * missing


def check_interleaved_micro_batches(num_micro_batches: int, pp_size: int, vp_size: int, flags: str) -> None:
    """ConfigError unless a training step's micro-batches fit megatron-core's interleaved schedule.

    With virtual stages megatron-core runs micro-batches in groups of PP per virtual stage
    (``microbatch_group_size_per_vp_stage``, Megatron's default) and refuses a last group smaller than
    PP mid-step; this says so before training.

    Args:
        num_micro_batches: micro-batches per step on each data-parallel rank.
        pp_size, vp_size: pipeline stages and model chunks per pipeline rank.
        flags: how the user chose the micro-batch count (for the message).
    """
    if vp_size <= 1 or num_micro_batches % pp_size == 0:
        return
    from megatron_dga.errors import ConfigError

    raise ConfigError(
        f"{flags} gives {num_micro_batches} micro-batches per step, and the interleaved pipeline schedule "
        f"(--pipeline-model-parallel-size {pp_size} with {vp_size} virtual stages per rank) runs them in groups of "
        f"{pp_size}: use a --global-batch-size that gives a multiple of {pp_size} micro-batches, or drop the "
        "virtual pipeline flag"
    )


def _stats(collected: List[torch.Tensor], micro_batches, config, device, keep_token_losses: bool) -> LossStats:
    """LossStats from the last stage's losses: one broadcast over the pipeline, one host copy."""
    masks = [mb["loss_mask"].float() for mb in micro_batches]
    shapes = [tuple(m.shape) for m in masks]
    rows = sum(s[0] for s in shapes)
    if keep_token_losses:
        # Every token's loss (the finite-difference estimator): (sum b, s) floats.
        flat = _from_last_stage(
            torch.cat(collected) if collected else None, (rows, shapes[0][1]), torch.float32, config, device
        )
        token_losses = list(torch.split(flat, [s[0] for s in shapes]))
        per_seq = flat.double().sum(dim=1).cpu().numpy()
    else:
        token_losses = None
        # Per sequence: its masked token-loss sum (domain sums and micro-batch means follow).
        per_seq = (
            _from_last_stage(
                torch.cat([t.double().sum(dim=1) for t in collected]) if collected else None,
                (rows,),
                torch.float64,
                config,
                device,
            )
            .cpu()
            .numpy()
        )
    seq_tokens = torch.cat([m.sum(dim=1) for m in masks]).double().numpy()
    bounds = np.cumsum([0] + [s[0] for s in shapes])
    micro_tokens = np.array([seq_tokens[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    micro_sums = np.array([per_seq[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    stats = LossStats(
        loss_sum=float((micro_sums / np.maximum(micro_tokens, 1.0)).sum()),
        num_micro_batches=len(micro_batches),
        tokens=int(seq_tokens.sum()),
        token_loss_sum=float(per_seq.sum()),
        per_domain_loss_sum={},
        per_domain_tokens={},
        token_losses=token_losses,
    )
    if all(mb.get("domain_id") is not None for mb in micro_batches):
        ids = torch.cat([mb["domain_id"] for mb in micro_batches]).numpy()
        for d in np.unique(ids):
            sel = ids == d
            stats.per_domain_loss_sum[int(d)] = float(per_seq[sel].sum())
            stats.per_domain_tokens[int(d)] = int(seq_tokens[sel].sum())
    return stats


def _from_last_stage(tensor: Optional[torch.Tensor], shape, dtype, config, device) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every stage (one broadcast; None off the last stage)."""
    if _pipeline_stages(config) == 1:
        return tensor
    from megatron.core import parallel_state as ps

    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    return comm.broadcast(
        tensor, ps.get_pipeline_model_parallel_world_size() - 1, ps.get_pipeline_model_parallel_group()
    )
