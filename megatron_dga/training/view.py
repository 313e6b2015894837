"""The trainer as a mixing strategy sees it: :class:`TrainerView` (the Protocol in mixing/base.py).

A strategy gets this object, not the trainer: extra forward/backward probes, the grad buffers,
the optimizer's second moments and collectives, each delegating to the trainer's model, data,
optimizer and process groups, and nothing of the loop.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_dga import comm
from megatron_dga.training.step import LossStats, forward_backward

PROBE_OVERFLOW_RETRIES = 4
"""With --fp16, how often a DGA probe that overflows is redone at half the loss scale (down to 1/16 of
the training scale: a probe batch whose gradient outgrows the training batches' by more is not
an overflow)."""


def local_grads_not_finite(ddp_chunks, device) -> torch.Tensor:
    """1.0 when any value in this rank's grad buffers is NaN or +-Inf, else 0.0 (float32, one element).

    One float32 sum per buffer: a NaN or an Inf anywhere makes the sum non-finite (Inf - Inf is NaN),
    and float32 accumulation cannot overflow on 16-bit gradients. No temporary the size of the buffer
    (an ``isfinite`` mask would cost 1 byte per parameter per probe: +7 GB on a 7B-parameter shard).
    """
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for ddp in ddp_chunks:
        for buffer in ddp.buffers + ddp.expert_parallel_buffers:
            bad += (~torch.isfinite(buffer.grad_data.sum(dtype=torch.float32))).float()
    return bad


class TrainerView:
    """What a mixing strategy may do with one trainer (``Trainer.view``)."""

    def __init__(self, trainer):
        self._trainer = trainer

    @property
    def iteration(self) -> int:
        """Optimizer steps completed so far."""
        return self._trainer.iteration

    @property
    def global_batch_size(self) -> int:
        """Sequences per training step over all data-parallel ranks (--global-batch-size)."""
        return self._trainer.cfg.schedule.global_batch_size

    # ------------------------------------------------------------------ start-up (MixingStrategy.setup)

    def set_basis(self, basis) -> None:
        """Sample the fine domains from basis distributions: the weights are over ``basis`` (a weights_io.Basis)."""
        self._trainer.data.set_basis(basis)

    def check_specific(self, size: int, flag: str) -> None:
        """Errors before training for a strategy that probes the specific set in batches of ``size`` (``flag``)."""
        self._trainer.data.check_specific(size, flag)

    def track_domain_losses(self) -> None:
        """From now on every training step also sums its token losses per domain (``step_domain_losses``)."""
        self._trainer.track_domain_losses = True

    def observe_training_backward(self, fn) -> None:
        """From now on each global batch is grouped by domain and ``fn(i, n, micro_batch, chunk)`` runs after
        each training micro-batch's backward on each model chunk (``step.forward_backward``'s ``after_backward``)."""
        trainer = self._trainer
        trainer.data.loader.group_by_domain = True
        trainer.after_backward = fn

    # ------------------------------------------------------------------ the training step

    def step_domain_losses(self) -> torch.Tensor:
        """The last training step's per-domain token-loss sums and token counts over the whole job: (2, k)
        float64 on the device, identical on every rank, from one all-reduce of 2k values (each sequence is
        counted once: on its data-parallel rank's last pipeline stage, tensor-parallel rank 0)."""
        trainer = self._trainer
        sums = trainer.last_domain_sums
        if sums is None:
            raise RuntimeError("step_domain_losses() needs track_domain_losses() at setup and a training step")
        sums = sums.clone()
        if not (trainer.ctx.is_last_stage and trainer.ctx.tp_rank == 0):
            sums.zero_()
        return comm.all_reduce(sums, trainer.groups.by_name("world"))

    # ------------------------------------------------------------------ probes

    def probe_domain(self, domain: int, size: int, groups: int = 0):
        return self._trainer.data.probe_domain(domain, size, groups)

    def probe_basis(self, basis: int, size: int, groups: int = 0):
        return self._trainer.data.probe_basis(basis, size, groups)

    def probe_specific(self, size: int):
        return self._trainer.data.probe_specific(size)

    def backward(self, micro_batches, *, sync_grads: bool) -> LossStats:
        """A probe's gradient in the grad buffers, unscaled (see :meth:`_probe_backward`)."""
        # With --fp16 the schedule scales the probe's loss by the optimizer's loss scale
        # (grad_scale_func), as for a training step. Dynamic loss scaling keeps that scale near the
        # largest the training batches allow, so a probe batch may overflow at it: the probe is then
        # redone at half the scale (megatron's scaler would halve it too), a few times at most; what
        # still overflows is a real NaN/Inf, which DGA reports and skips.
        trainer = self._trainer
        scale = trainer.optimizer.loss_scale
        stats = self._probe_backward(micro_batches, sync_grads, None)
        for _ in range(PROBE_OVERFLOW_RETRIES):
            if not (trainer.cfg.model.fp16 and scale > 1.0 and self._probe_overflowed(sync_grads)):
                break
            scale /= 2.0
            stats = self._probe_backward(micro_batches, sync_grads, scale)
        # DGA gets true gradients (alignments, norms, the fd direction). A power of two: exact.
        if scale != 1.0:
            for ddp in trainer.ddp_chunks:
                ddp.scale_gradients(1.0 / scale)
        return stats

    def _probe_backward(self, micro_batches, sync_grads: bool, scale: Optional[float]) -> LossStats:
        """Zero the buffers, forward/backward ``micro_batches``; ``scale`` replaces the loss scale."""
        trainer = self._trainer
        trainer.zero_grads()
        config = trainer.config
        if scale is not None:
            config.grad_scale_func = lambda loss: loss * scale
        try:
            # A synchronised probe (the specific gradient g_spe) must be whole on every rank, also
            # with the distributed optimizer, whose training steps only reduce-scatter.
            return forward_backward(
                trainer.ddp_chunks,
                micro_batches,
                trainer.ctx.device,
                sync_grads=sync_grads,
                force_all_reduce=sync_grads,
            )
        finally:
            config.grad_scale_func = trainer.optimizer.scale_loss

    def _probe_overflowed(self, sync_grads: bool) -> bool:
        """Any rank's probe gradient not finite. A local probe (no data-parallel reduction) runs in
        step with its model-parallel peers only, so only they agree; a synchronised one with all."""
        trainer = self._trainer
        bad = local_grads_not_finite(trainer.ddp_chunks, trainer.ctx.device)
        comm.all_reduce(bad, trainer.groups.by_name("world" if sync_grads else "mp"))
        return bool(bad.item() > 0)

    def forward_token_losses(self, micro_batches) -> List[torch.Tensor]:
        """Per-token losses (b, s) times the loss mask of each micro-batch: forward only, no grad."""
        trainer = self._trainer
        stats = forward_backward(
            trainer.ddp_chunks, micro_batches, trainer.ctx.device, forward_only=True, keep_token_losses=True
        )
        return stats.token_losses

    # ------------------------------------------------------------------ parameters, gradients, optimizer

    def grads(self) -> List[torch.Tensor]:
        return [p.main_grad for p in self._trainer.params]

    def counted(self) -> List[bool]:
        return self._trainer.counted_params

    def counted_before_reduction(self) -> List[bool]:
        from megatron_dga.training.optim import counted_local_params

        return counted_local_params(self._trainer.params)

    def param_chunks(self) -> List[int]:
        return [c for c, ddp in enumerate(self._trainer.ddp_chunks) for p in ddp.parameters() if p.requires_grad]

    def parameters(self) -> List[torch.Tensor]:
        """The trainable parameters, in grads() order (the finite-difference estimator moves them)."""
        return self._trainer.params

    def adam_preconditioner(self) -> Optional[Dict[str, object]]:
        trainer = self._trainer
        moments = trainer.optimizer.adam_second_moments(trainer.params)
        if moments is None:
            return None
        return {**moments, "eps": trainer.cfg.optimizer.adam_eps}

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, tensor: torch.Tensor, group: str = "world") -> torch.Tensor:
        return comm.all_reduce(tensor, self._trainer.groups.by_name(group))

    def data_parallel(self):
        ctx = self._trainer.ctx
        return ctx.dp_rank, ctx.dp_size

    def model_parallel_leader(self) -> bool:
        ctx = self._trainer.ctx
        return ctx.tp_rank == 0 and ctx.pp_rank == 0

    def domain_budget(self):
        trainer = self._trainer
        sampler = trainer.data.sampler
        steps_left = max(trainer.cfg.schedule.train_iters - trainer.iteration, 0)
        return {
            "distinct": sampler.accessible_sizes,
            "used": sampler.consumption(reset=False)["samples"],
            "remaining": steps_left * trainer.cfg.schedule.global_batch_size,
        }
