"""The training loop: megatron-core GPT + DDP on a dynamic domain mixture.

Each iteration: draw the next global batch from the current weights, forward/backward
over this rank's micro-batches (megatron-core's schedule, ``training/step.py``),
megatron-core's optimizer step and LR/WD schedule (``training/optim.py``); then the
hooks — mixing (which may hand the sampler new weights), logging, evaluation,
checkpointing. With pipeline parallelism each rank holds one stage (with virtual pipeline
stages, several model chunks: ``Trainer.chunks``); losses come back identical on every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from megatron_dga import comm, platform
from megatron_dga.errors import ConfigError, NumericalError
from megatron_dga.fileio import atomic_write_json
from megatron_dga.mixing.base import MixingStrategy, build_mixing
from megatron_dga.model import build_model_chunks, uses_transformer_engine
from megatron_dga.platform import ParallelContext
from megatron_dga.training import resume, stopping
from megatron_dga.training.config import PretrainConfig
from megatron_dga.training.data import DataPipeline
from megatron_dga.training.metrics import MetricsLogger, Throughput, console_print
from megatron_dga.training.outputs import prepare_outputs
from megatron_dga.training.optim import Optimizer, counted_params, ddp_config
from megatron_dga.rng import capture_rng_state, restore_rng_state
from megatron_dga.training.step import check_interleaved_micro_batches, forward_backward

from megatron_dga.training.view import TrainerView

logger = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data and mixing of one job; ``train()`` runs it."""

    def __init__(self, cfg: PretrainConfig, ctx: ParallelContext):
        from megatron.core.distributed import DistributedDataParallel

        self.cfg, self.ctx = cfg, ctx
        # First, before any dataset or model is built: an unwritable --save/--log-dir fails now.
        log_dir = prepare_outputs(cfg, ctx)
        self.num_micro_batches = cfg.schedule.num_micro_batches(ctx.dp_size)
        check_interleaved_micro_batches(
            self.num_micro_batches,
            ctx.pp_size,
            ctx.vp_size,
            f"--global-batch-size {cfg.schedule.global_batch_size} / (--micro-batch-size "
            f"{cfg.schedule.micro_batch_size} x data-parallel size {ctx.dp_size})",
        )
        cfg = resume.align_domains_to_checkpoint(cfg)  # a reordered --data-path resumes by domain name
        self.data = DataPipeline(cfg, ctx)
        # The config is read-only once parsed: the one the job runs with is a copy with the tokenizer's vocabulary.
        self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.data.vocab_size))
        # This rank's pipeline stage (the whole model with one stage), one chunk per virtual stage; with
        # --bf16/--fp16 wrapped in megatron's Float16Module, as Megatron's get_model does.
        built = build_model_chunks(cfg.model, ctx)
        self.chunks = [core for core, _ in built]  # megatron GPTModels, in virtual-stage order
        # The chunks in megatron DDP (their grad buffers receive the gradients). As Megatron's get_model:
        # only the first chunk's grad buffer is split into buckets.
        self.ddp_chunks = [
            DistributedDataParallel(core.config, ddp_config(cfg.optimizer), module, disable_bucketing=i > 0)
            for i, (core, module) in enumerate(built)
        ]
        self.groups = ctx.groups
        self.optimizer = Optimizer(
            self.ddp_chunks, cfg.optimizer, bf16=cfg.model.bf16, fp16=cfg.model.fp16, schedule=cfg.schedule
        )
        # As Megatron's train(): the schedule multiplies each loss by the optimizer's loss scale
        # (--fp16; 1 otherwise), and the optimizer divides the gradients by it before clipping.
        self.config.grad_scale_func = self.optimizer.scale_loss
        # Every chunk's parameters, each once (chunks hold disjoint layers).
        self.params = [p for ddp in self.ddp_chunks for p in ddp.parameters() if p.requires_grad]
        self.counted_params = counted_params(self.params)  # per parameter: counted on this rank (not a copy)
        self.track_domain_losses = False  # set by a strategy rewarded by per-domain training losses (view)
        self.after_backward = None  # set by a strategy that reads each training micro-batch's gradient (view)
        self.last_domain_sums: Optional[torch.Tensor] = None  # then: the last step's (2, k) sums, on the device
        self.view = TrainerView(self)  # what the mixing strategy sees
        self.mixing: MixingStrategy = build_mixing(cfg.mixing, self.data.domain_info)
        self.mixing.setup(self.view)
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        if cfg.checkpoint.load:
            self.load_checkpoint(cfg.checkpoint.load)
        else:
            self.data.set_weights(self.mixing.initial_weights())
        self.metrics = self._build_metrics(log_dir)
        self.throughput = Throughput()
        self._pending_save = None  # a checkpoint being checksummed in the background
        self.stop = stopping.StopConditions(cfg.schedule, ctx.device)
        if ctx.is_logging_rank:
            self._write_run_info(log_dir)
        self._window_losses: List[torch.Tensor] = []  # one-element float64 device tensors
        self._window_grad_norms: List[float] = []
        self._window_skipped = 0  # steps megatron skipped since the last log line (fp16 overflows)

    @property
    def config(self):
        """The megatron TransformerConfig every chunk shares (the schedule reads its hooks)."""
        return self.chunks[0].config

    @property
    def model(self):
        """The megatron GPTModel of this rank; with virtual pipeline stages use ``chunks``."""
        return self._only(self.chunks)

    @property
    def ddp(self):
        """The DDP-wrapped model of this rank; with virtual pipeline stages use ``ddp_chunks``."""
        return self._only(self.ddp_chunks)

    @staticmethod
    def _only(chunks):
        if len(chunks) != 1:
            raise RuntimeError(
                f"this rank holds {len(chunks)} model chunks (virtual pipeline stages); "
                "iterate over Trainer.chunks / Trainer.ddp_chunks"
            )
        return chunks[0]

    def _build_metrics(self, log_dir: str) -> MetricsLogger:
        """The metrics sinks; a W&B start-up failure on the logging rank stops every rank."""
        cfg = self.cfg
        wandb_init = None
        if cfg.logging.wandb_project:  # Megatron's wandb.init arguments
            wandb_init = dict(
                project=cfg.logging.wandb_project,
                name=cfg.logging.wandb_exp_name or os.path.basename(os.path.normpath(log_dir)),
                dir=cfg.logging.wandb_save_dir or log_dir,
                config=dataclasses.asdict(cfg),
            )
        error, metrics = None, None
        try:
            metrics = MetricsLogger(
                log_dir,
                cfg.logging.tensorboard_dir,
                is_writer=self.ctx.is_logging_rank,
                log_interval=cfg.schedule.log_interval,
                train_iters=cfg.schedule.train_iters,
                start_iteration=self.iteration,
                domain_names=self.data.domain_info.names,
                list_labels={
                    # With a hierarchical --domain-map the eval losses are per top-level cluster.
                    "domain_eval_loss": list(self.data.eval_names or []),
                    **self.mixing.list_labels(),  # e.g. with --dga-basis, DGA's lists run over the bases
                },
                wandb_init=wandb_init,
                list_limit=cfg.logging.log_domains_limit,  # longer per-domain lists are summarised
                domain_clusters=self.data.domain_groups,
                cluster_names=self.data.domain_group_names,
            )
        except ConfigError as exc:
            error = str(exc)
        if wandb_init is not None:  # only the logging rank starts W&B: the others learn of its failure
            error = next((e for e in comm.all_gather_object(error) if e), None)
        if error:
            if metrics is not None:
                metrics.close()
            raise ConfigError(error)
        return metrics

    def _write_run_info(self, log_dir: str) -> None:
        """run_info.json beside metrics.jsonl: the names behind list metrics, and the config."""
        info = {
            "domains": self.data.domain_info.names,
            "basis_names": self.mixing.basis_names,
            "world": {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size, "dp": self.ctx.dp_size, "vp": self.ctx.vp_size},
            "config": dataclasses.asdict(self.cfg),
        }
        atomic_write_json(os.path.join(log_dir, "run_info.json"), info, indent=1, default=str)

    # ------------------------------------------------------------------ the loop

    def train(self) -> Dict[str, float]:
        """Train to --train-iters; returns the last logged metrics."""
        sched = self.cfg.schedule
        last: Dict[str, float] = {}
        if self.ctx.is_logging_rank:
            console_print(
                f"training {self.cfg.model.num_parameters():,} parameters on {self.ctx.describe()}, "
                f"{self.data.domain_info.k} domains, mixing={self.cfg.mixing.strategy}, "
                f"layers={'transformer-engine' if uses_transformer_engine(self.cfg.model) else 'local'}, "
                f"from iteration {self.iteration}"
            )
        self.throughput.reset()
        while self.iteration < sched.train_iters:
            loss, grad_norm, lr = self._step()
            self.iteration += 1
            # The loss stays on the device (read when logged); megatron's grad norm is on the host. A
            # non-finite loss makes the gradient non-finite, so only then (or when megatron skipped
            # the step) is the loss read here.
            if sched.check_for_nan_in_loss_and_grad and (grad_norm is None or not math.isfinite(grad_norm)):
                self._check_finite(float(loss), grad_norm)
            new_weights = self.mixing.after_step(self.view)
            if new_weights is not None:
                self.data.set_weights(new_weights)
            self._window_losses.append(loss)
            if grad_norm is None:  # megatron skipped the step (fp16 overflow)
                self._window_skipped += 1
            else:
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
                if self.ctx.is_logging_rank:  # every stop condition needs --save (config.py), so it saved
                    console_print(f"exiting at iteration {self.iteration}: {stop}")
                break
        self.finish_pending_save()
        self.stop.restore_handlers()
        self.sync_params()  # the parameters as the optimizer left them, for whoever reads them next
        self.metrics.close()
        return last

    def _check_finite(self, loss: float, grad_norm: Optional[float]) -> None:
        """Stop the run, naming the iteration, when the step's loss or grad norm is not finite.

        Both values are identical on every rank (the loss is the data-parallel mean, the norm
        megatron's global one), so every rank stops at the same iteration, before the save hook.
        A step megatron skipped (``grad_norm`` None: fp16 gradients overflowed at the current loss
        scale) is no error: the weights did not move and the loss scaler lowers the scale, as in
        Megatron; its loss is still checked.
        """
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            return
        self.finish_pending_save()  # it was checked finite: publish it, the message points to it
        from megatron_dga.training.checkpoint import latest_iteration

        last = latest_iteration(self.cfg.checkpoint.save) if self.cfg.checkpoint.save else None
        resume = (
            f"the last checkpoint (iteration {last}) under --save {self.cfg.checkpoint.save} is finite; "
            f"resume from it with a lower --lr"
            if last is not None
            else "lower --lr and restart"
        )
        raise NumericalError(
            f"iteration {self.iteration}: the training loss is {loss} and the grad norm {grad_norm}; stopped "
            f"without saving ({resume}, or pass --no-check-for-nan-in-loss-and-grad to train on)"
        )

    def zero_grads(self) -> None:
        """Clear the grad buffers and the optimizer's grads before any forward/backward.

        Both, always: megatron's FP32Optimizer leaves ``param.grad`` aliased to ``main_grad``
        after a step, and the next backward would add into it twice.
        """
        for ddp in self.ddp_chunks:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def train_step(self):
        """One optimizer step on the next global batch. Returns (global mean loss, grad norm, lr);
        the grad norm is None when megatron skipped the step (an fp16 overflow)."""
        loss, grad_norm, lr = self._step()
        return float(loss), grad_norm, lr

    def _step(self):
        """:meth:`train_step` with the loss left on the device (a one-element float64 tensor)."""
        lr = self.optimizer.lr
        self.zero_grads()
        micro_batches = self.data.next_train_micro_batches()
        stats = forward_backward(
            self.ddp_chunks,
            micro_batches,
            self.ctx.device,
            sync_grads=True,
            host_stats=False,
            num_domains=self.data.domain_info.k if self.track_domain_losses else None,
            after_backward=self.after_backward,
        )
        self.last_domain_sums = stats.domain_sums
        grad_norm = self.optimizer.step()
        loss = self._dp_mean(stats.mean_loss)
        tokens = self.cfg.schedule.global_batch_size * self.cfg.model.seq_length
        self.consumed_samples += self.cfg.schedule.global_batch_size
        self.consumed_tokens += tokens
        self.throughput.step(tokens=tokens, samples=self.cfg.schedule.global_batch_size)
        return loss, grad_norm, lr

    def _dp_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks of a one-element device tensor, left on the device."""
        if self.ctx.dp_size == 1:
            return value
        t = value.clone()
        comm.all_reduce(t, self.groups.dp)
        return t / self.ctx.dp_size

    # ------------------------------------------------------------------ hooks

    def _log(self, lr: float, window, eval_results: Dict[str, object]) -> Dict[str, object]:
        values: Dict[str, object] = {
            "lm_loss": float(torch.cat(self._window_losses).mean()),  # the window's one host read
            "lr": lr,
            # Over the steps applied in the window; none when megatron skipped them all (as Megatron).
            **({"grad_norm": float(np.mean(self._window_grad_norms))} if self._window_grad_norms else {}),
            "tokens_per_sec": window.tokens_per_sec,
            "ms_per_iter": window.ms_per_iter,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "domain_weights": [float(w) for w in self.data.weights],
        }
        if self.cfg.model.fp16:  # Megatron's "loss scale" and "number of skipped iterations"
            values["loss_scale"] = self.optimizer.loss_scale
            values["skipped_iterations"] = self._window_skipped
        values.update(self.data.consumption_since_last_log())
        values.update(self.mixing.metrics())
        values.update(eval_results)
        self._window_losses.clear()
        self._window_grad_norms.clear()
        self._window_skipped = 0
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
        if self.data.eval_names is not None:  # None: too many fine domains in a flat map (logged at start-up)
            results["domain_eval_loss"] = [
                self._eval_loss(self.data.domain_eval_micro_batches(i, iters)) for i in range(len(self.data.eval_names))
            ]
        restore_rng_state(rng)
        return results

    def _eval_loss(self, micro_batches) -> float:
        """Token-weighted mean loss over micro-batches spread across data-parallel ranks."""
        for ddp in self.ddp_chunks:
            ddp.eval()
        stats = forward_backward(self.ddp_chunks, micro_batches, self.ctx.device, forward_only=True)
        for ddp in self.ddp_chunks:
            ddp.train()
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
        self.sync_params()
        with stopping.interrupt_deferred():  # Ctrl-C mid-save: after it, see stopping.py
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

    def sync_params(self) -> None:
        """With --overlap-param-gather, all-gather the parameters the last step updated now.

        The distributed optimizer leaves each rank its own shard of the new values; megatron's
        forward pre-hooks gather the rest at the next forward. What reads the parameters without a
        forward (a checkpoint save, the caller of ``train()``) gathers first, as Megatron's
        ``disable_forward_pre_hook`` does before its saves. A no-op without the flag.
        """
        if self.ddp_chunks[0].ddp_config.overlap_param_gather:
            with platform.megatron_cuda_calls_on_cpu():
                for ddp in self.ddp_chunks:
                    ddp.start_param_sync(force_sync=True)

    def _report_saved(self, iteration: int, path) -> None:
        if self.ctx.is_logging_rank:
            console_print(f"saved checkpoint at iteration {iteration} to {path}")

    def load_checkpoint(self, load_dir: str) -> None:
        iteration = resume.load_job(self, load_dir)
        if self.ctx.is_logging_rank:
            console_print(
                f"loaded the model weights of {load_dir} (iteration {iteration}) to finetune from iteration 0"
                if self.cfg.checkpoint.finetune
                else f"resumed from {load_dir} at iteration {iteration}"
            )
