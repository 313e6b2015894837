"""The training loop: megatron-core GPT + DDP on a dynamic domain mixture.

Each iteration: draw the next global batch from the current weights, forward/backward
over this rank's micro-batches (megatron-core's schedule, ``training/step.py``),
megatron-core's optimizer step and LR/WD schedule (``training/optim.py``); then the
hooks — mixing (which may hand the sampler new weights), logging, evaluation,
checkpointing. With pipeline parallelism each rank holds one stage; losses come back
identical on every stage.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Dict, List

import numpy as np
import torch

from megatron_dga import comm
from megatron_dga.errors import NumericalError
from megatron_dga.fileio import atomic_write_json
from megatron_dga.mixing.base import MixingStrategy, build_mixing
from megatron_dga.model import build_stage_model, uses_transformer_engine
from megatron_dga.platform import ParallelContext
from megatron_dga.training import resume
from megatron_dga.training.config import PretrainConfig
from megatron_dga.training.data import DataPipeline
from megatron_dga.training.metrics import MetricsLogger, Throughput
from megatron_dga.training.outputs import prepare_outputs
from megatron_dga.training.optim import Optimizer, counted_params
from megatron_dga.training.rng import capture_rng_state, restore_rng_state
from megatron_dga.training.step import LossStats, forward_backward
from megatron_dga.training.stopping import StopConditions

logger = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data and mixing of one job; ``train()`` runs it."""

    def __init__(self, cfg: PretrainConfig, ctx: ParallelContext):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.cfg, self.ctx = cfg, ctx
        # First, before any dataset or model is built: an unwritable --save/--log-dir fails now.
        log_dir = prepare_outputs(cfg, ctx)
        self.num_micro_batches = cfg.schedule.num_micro_batches(ctx.dp_size)
        resume.align_domains_to_checkpoint(cfg)  # a reordered --data-path resumes by domain name
        self.data = DataPipeline(cfg, ctx)
        cfg.model.vocab_size = self.data.vocab_size
        # This rank's pipeline stage (the whole model with one stage); with --bf16 wrapped in
        # megatron's Float16Module, as Megatron's get_model does.
        self.model, module = build_stage_model(cfg.model, ctx)
        self.ddp = DistributedDataParallel(
            self.model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer),
            module,
        )
        self.groups = ctx.groups
        self.optimizer = Optimizer(self.ddp, cfg.optimizer, bf16=cfg.model.bf16, train_iters=cfg.schedule.train_iters)
        self.params = [p for p in self.ddp.parameters() if p.requires_grad]
        self._counted = counted_params(self.params)
        self.mixing: MixingStrategy = build_mixing(cfg.mixing, self.data.domain_info)
        if self.mixing.basis is not None:
            self.data.set_basis(self.mixing.basis)
        if self.mixing.needs_specific_set:
            self.data.check_specific(cfg.mixing.dga_specific_batch_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        if cfg.checkpoint.load:
            self.load_checkpoint(cfg.checkpoint.load)
        else:
            self.data.set_weights(self.mixing.initial_weights())
        self.metrics = MetricsLogger(
            log_dir,
            cfg.logging.tensorboard_dir,
            is_writer=ctx.is_logging_rank,
            log_interval=cfg.schedule.log_interval,
            train_iters=cfg.schedule.train_iters,
            start_iteration=self.iteration,
            domain_names=self.data.domain_info.names,
            # With --dga-basis the per-update lists run over the N bases, not the K domains.
            list_labels=None if self.mixing.basis is None else {
                key: list(self.mixing.basis.basis_names)
                for key in ("alignments", "domain_grad_norms", "basis_weights")
            },
        )
        self.throughput = Throughput()
        self._pending_save = None  # a checkpoint being checksummed in the background
        self.stop = StopConditions(cfg.schedule, ctx.device)
        if ctx.is_logging_rank:
            self._write_run_info(log_dir)
        self._window_losses: List[float] = []
        self._window_grad_norms: List[float] = []

    def _write_run_info(self, log_dir: str) -> None:
        """run_info.json beside metrics.jsonl: the names behind list metrics, and the config."""
        info = {
            "domains": self.data.domain_info.names,
            "basis_names": None if self.mixing.basis is None else list(self.mixing.basis.basis_names),
            "world": {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size, "dp": self.ctx.dp_size},
            "config": dataclasses.asdict(self.cfg),
        }
        atomic_write_json(os.path.join(log_dir, "run_info.json"), info, indent=1, default=str)

    # ------------------------------------------------------------------ the loop

    def train(self) -> Dict[str, float]:
        """Train to --train-iters; returns the last logged metrics."""
        sched = self.cfg.schedule
        last: Dict[str, float] = {}
        if self.ctx.is_logging_rank:
            print(f"training {self.cfg.model.num_parameters():,} parameters on {self.ctx.describe()}, "
                  f"{self.data.domain_info.k} domains, mixing={self.cfg.mixing.mixing}, "
                  f"layers={'transformer-engine' if uses_transformer_engine(self.cfg.model) else 'local'}, "
                  f"from iteration {self.iteration}", flush=True)
        self.throughput.reset()
        while self.iteration < sched.train_iters:
            loss, grad_norm, lr = self.train_step()
            self.iteration += 1
            if sched.check_for_nan_in_loss_and_grad:
                self._check_finite(loss, grad_norm)
            new_weights = self.mixing.after_step(self)
            if new_weights is not None:
                self.data.set_weights(new_weights)
            self._window_losses.append(loss)
            self._window_grad_norms.append(grad_norm)
            done = self.iteration == sched.train_iters
            eval_now = sched.eval_interval and (self.iteration % sched.eval_interval == 0 or done)
            if eval_now or self.iteration % sched.log_interval == 0 or done:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the throughput clock is the host's
                window = self.throughput.window()
                # One metrics.jsonl entry per logged iteration, eval results included.
                last = self._log(lr, window, self.evaluate() if eval_now else {})
                self.throughput.reset()  # evaluation time is not training throughput
            stop = None if done else self.stop.reason(self.iteration)
            self._poll_pending_save()
            if self._should_save() or (stop and self.cfg.checkpoint.save):
                # Interval saves publish in the background; the last one before exiting does not.
                self.save_checkpoint(blocking=bool(done or stop))
                self.throughput.reset()
            if stop:
                if self.ctx.is_logging_rank:
                    saved = "" if self.cfg.checkpoint.save else " without saving (no --save)"
                    print(f"exiting at iteration {self.iteration}{saved}: {stop}", flush=True)
                break
        self.finish_pending_save()
        self.stop.restore_handlers()
        return last

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """Stop the run, naming the iteration, when the step's loss or grad norm is not finite.

        Both values are identical on every rank (the loss is the data-parallel mean, the norm
        megatron's global one), so every rank stops at the same iteration, before the save hook.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.finish_pending_save()  # it was checked finite: publish it, the message points to it
        from megatron_dga.training.checkpoint import latest_iteration

        last = latest_iteration(self.cfg.checkpoint.save) if self.cfg.checkpoint.save else None
        resume = (f"the last checkpoint (iteration {last}) under --save {self.cfg.checkpoint.save} is finite; "
                  f"resume from it with a lower --lr" if last is not None else "lower --lr and restart")
        raise NumericalError(
            f"iteration {self.iteration}: the training loss is {loss} and the grad norm {grad_norm}; stopped "
            f"without saving ({resume}, or pass --no-check-for-nan-in-loss-and-grad to train on)"
        )

    def zero_grads(self) -> None:
        """Clear the grad buffers and the optimizer's grads before any forward/backward.

        Both, always: megatron's FP32Optimizer leaves ``param.grad`` aliased to ``main_grad``
        after a step, and the next backward would add into it twice.
        """
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def train_step(self):
        """One optimizer step on the next global batch. Returns (global mean loss, grad norm, lr)."""
        lr = self.optimizer.lr
        self.zero_grads()
        micro_batches = self.data.next_train_micro_batches()
        stats = forward_backward(self.ddp, micro_batches, self.ctx.device, sync_grads=True)
        grad_norm = self.optimizer.step()
        loss = self._dp_mean(stats.mean_loss)
        tokens = self.cfg.schedule.global_batch_size * self.cfg.model.seq_length
        self.consumed_samples += self.cfg.schedule.global_batch_size
        self.consumed_tokens += tokens
        self.throughput.step(tokens=tokens, samples=self.cfg.schedule.global_batch_size)
        return loss, grad_norm, lr

    def _dp_mean(self, value: float) -> float:
        if self.ctx.dp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.ctx.device)
        comm.all_reduce(t, self.groups.dp)
        return float(t) / self.ctx.dp_size

    # ------------------------------------------------------------------ hooks

    def _log(self, lr: float, window, eval_results: Dict[str, object]) -> Dict[str, object]:
        values: Dict[str, object] = {
            "lm_loss": float(np.mean(self._window_losses)),
            "lr": lr,
            "grad_norm": float(np.mean(self._window_grad_norms)),
            "tokens_per_sec": window.tokens_per_sec,
            "ms_per_iter": window.ms_per_iter,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "domain_weights": [float(w) for w in self.data.weights],
        }
        values.update(self.data.consumption_since_last_log())
        values.update(self.mixing.metrics())
        values.update(eval_results)
        self._window_losses.clear()
        self._window_grad_norms.clear()
        self.metrics.log(self.iteration, values)
        return values

    def evaluate(self) -> Dict[str, object]:
        """Specific-set eval loss and per-domain eval loss on fixed held-out batches."""
        iters = self.cfg.schedule.eval_iters
        if iters == 0:
            return {}
        results: Dict[str, object] = {}
        rng = capture_rng_state()
        if self.data.has_specific_eval:
            results["specific_eval_loss"] = self._eval_loss(self.data.specific_eval_micro_batches(iters))
        results["domain_eval_loss"] = [
            self._eval_loss(self.data.domain_eval_micro_batches(d, iters)) for d in range(self.data.domain_info.k)
        ]
        restore_rng_state(rng)
        return results

    def _eval_loss(self, micro_batches) -> float:
        """Token-weighted mean loss over micro-batches spread across data-parallel ranks."""
        self.ddp.eval()
        stats = forward_backward(self.ddp, micro_batches, self.ctx.device, forward_only=True)
        self.ddp.train()
        t = torch.tensor([stats.token_loss_sum, float(stats.tokens)], dtype=torch.float64, device=self.ctx.device)
        comm.all_reduce(t, self.groups.dp)
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def _should_save(self) -> bool:
        cfg = self.cfg.checkpoint
        if not cfg.save:
            return False
        if self.iteration == self.cfg.schedule.train_iters:
            return True
        return bool(cfg.save_interval) and self.iteration % cfg.save_interval == 0

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, *, blocking: bool = True) -> None:
        """Save this iteration. Non-blocking: return once the files are written; their checksums
        are computed in a background thread and the checkpoint is published by a later
        ``_poll_pending_save``/``finish_pending_save`` (called by every rank at the same step)."""
        self.finish_pending_save()
        if blocking:
            self._report_saved(self.iteration, resume.save_job(self))
        else:
            self._pending_save = resume.save_job(self, background=True)

    def _poll_pending_save(self) -> None:
        if self._pending_save is not None and self._pending_save.ready(self.ctx.device):
            self.finish_pending_save()

    def finish_pending_save(self) -> None:
        """Publish the checkpoint saved in the background, waiting for its checksums if need be."""
        if self._pending_save is not None:
            pending, self._pending_save = self._pending_save, None
            self._report_saved(pending.iteration, pending.finish())

    def _report_saved(self, iteration: int, path) -> None:
        if self.ctx.is_logging_rank:
            print(f"saved checkpoint at iteration {iteration} to {path}", flush=True)

    def load_checkpoint(self, load_dir: str) -> None:
        iteration = resume.load_job(self, load_dir)
        if self.ctx.is_logging_rank:
            print(f"resumed from {load_dir} at iteration {iteration}", flush=True)

    # ------------------------------------------------------------------ TrainerView (for mixing strategies)

    def probe_domain(self, domain: int, size: int):
        return self.data.probe_domain(domain, size)

    def probe_basis(self, basis: int, size: int):
        return self.data.probe_basis(basis, size)

    def probe_specific(self, size: int):
        return self.data.probe_specific(size)

    def backward(self, micro_batches, *, sync_grads: bool) -> LossStats:
        self.zero_grads()
        # A synchronised probe (the specific gradient g_spe) must be whole on every rank, also
        # with the distributed optimizer, whose training steps only reduce-scatter.
        return forward_backward(self.ddp, micro_batches, self.ctx.device, sync_grads=sync_grads,
                                force_all_reduce=sync_grads)

    def grads(self) -> List[torch.Tensor]:
        return [p.main_grad for p in self.params]

    def counted(self) -> List[bool]:
        return self._counted

    def parameters(self) -> List[torch.Tensor]:
        """The trainable parameters, in grads() order (the finite-difference estimator moves them)."""
        return self.params

    def forward_token_losses(self, micro_batches) -> List[torch.Tensor]:
        """Per-token losses (b, s) times the loss mask of each micro-batch: forward only, no grad."""
        stats = forward_backward(self.ddp, micro_batches, self.ctx.device, forward_only=True, keep_token_losses=True)
        return stats.token_losses

    def adam_preconditioner(self):
        moments = self.optimizer.adam_second_moments(self.params)
        if moments is None:
            return None
        return {**moments, "eps": self.cfg.optimizer.adam_eps}

    def all_reduce(self, tensor: torch.Tensor, group: str = "world") -> torch.Tensor:
        return comm.all_reduce(tensor, self.groups.by_name(group))

    def data_parallel(self):
        return self.ctx.dp_rank, self.ctx.dp_size
