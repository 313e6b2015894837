"""megatron-core's optimizer and learning-rate/weight-decay scheduler, on CPU and GPU alike.

``get_megatron_optimizer`` picks megatron's FP32Optimizer, its bf16/fp16 mixed-precision
optimizer (fp32 master weights; with fp16 a static or dynamic loss scaler that skips the
steps whose gradients overflow) or its DistributedOptimizer (state sharded over
data-parallel ranks); it does the global grad norm (TP duplicates and tied copies
counted once) and the clipping. ``OptimizerParamScheduler`` applies the LR warmup/decay
and each parameter group's ``wd_mult``/``lr_mult`` (no weight decay on biases and norm
gains). The same classes run in CI on CPU (inside ``platform.megatron_cuda_calls_on_cpu``,
which gives their few hard-coded CUDA calls CPU meanings) and on GPUs untouched.

Only megatron-core's optimizer implementation differs by machine: transformer-engine's
(or apex's) FusedAdam where installed, torch's AdamW otherwise (megatron-core's choice).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch

from megatron_dga import platform
from megatron_dga.errors import ConfigError
from megatron_dga.training.config import OptimizerConfig, ScheduleConfig


def counted_params(params) -> List[bool]:
    """For each parameter: does this rank count it in global sums (norms, alignments)?

    Tensor-parallel duplicates (e.g. layer norms, replicated on every TP rank) count on
    TP rank 0 only; tied copies (the output layer sharing the embedding on the last
    pipeline stage) are marked ``shared`` and count on the stage that owns them.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return [bool(param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)) for p in params]


def counted_local_params(params) -> List[bool]:
    """For each parameter: does this rank count it in a sum over this rank's gradients BEFORE the step's
    reduction (DGA's in-step estimator)? Tensor-parallel duplicates on TP rank 0 only, as
    :func:`counted_params`, except those marked ``sequence_parallel`` (the norms under --sequence-parallel):
    until ``finalize_model_grads`` all-reduces them over TP each rank holds the gradient of its own
    sequence shard, so every rank counts its part. And both tied copies: until then the first stage's
    embedding and the last stage's output layer each hold their own part of the tied gradient."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    return [bool(param_is_not_tensor_parallel_duplicate(p) or getattr(p, "sequence_parallel", False)) for p in params]


def megatron_optimizer_config(cfg: OptimizerConfig, *, bf16: bool, fp16: bool = False):
    """megatron-core's OptimizerConfig for our flags (one place maps them).

    With ``fp16`` megatron-core builds its fp16 optimizer (fp32 master weights) with a static
    (--loss-scale) or dynamic loss scaler; the unset loss-scale flags take Megatron-LM's defaults.
    The schedule must then scale each loss by the optimizer's ``scale_loss`` (Megatron's
    ``config.grad_scale_func``), which the optimizer undoes before clipping.
    """
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig

    def given(value, default):
        return default if value is None else value

    return McoreOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        fp16=fp16,
        params_dtype=torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32,
        loss_scale=cfg.loss_scale,
        initial_loss_scale=given(cfg.initial_loss_scale, 2.0**32),
        min_loss_scale=given(cfg.min_loss_scale, 1.0),
        loss_scale_window=given(cfg.loss_scale_window, 1000),
        hysteresis=given(cfg.hysteresis, 2),
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def ddp_config(cfg: OptimizerConfig):
    """megatron-core's DistributedDataParallelConfig for our flags (Megatron's names and meanings).

    Gradients accumulate and reduce in fp32 (also with --bf16/--fp16); --overlap-grad-reduce,
    --overlap-param-gather and --ddp-bucket-size map onto the fields of the same names.
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        overlap_param_gather=cfg.overlap_param_gather,
        bucket_size=cfg.ddp_bucket_size,
    )


def scheduler_arguments(cfg: OptimizerConfig, schedule: ScheduleConfig) -> dict:
    """Keyword arguments of megatron-core's OptimizerParamScheduler, counted in iterations.

    The trainer steps the scheduler once per iteration. Megatron-LM steps it by the global
    batch size (it counts samples, converting --lr-warmup-iters/--lr-decay-iters to samples);
    here the sample flags of a --train-samples run are converted to iterations instead
    (samples / --global-batch-size, fractional where they do not divide). Every decay style
    is a function of step/warmup and (step - warmup)/(decay - warmup), so each iteration gets
    Megatron's learning rate. --lr-warmup-fraction F warms up over F x the decay length.
    """
    flags = scheduler_flags(schedule)
    if schedule.train_samples is None:
        decay = cfg.lr_decay_iters or schedule.train_iters
        warmup, wd_incr = cfg.lr_warmup_iters, schedule.train_iters
    else:
        per_iteration = schedule.global_batch_size
        decay = (cfg.lr_decay_samples or schedule.train_samples) / per_iteration
        warmup, wd_incr = cfg.lr_warmup_samples / per_iteration, schedule.train_samples / per_iteration
    if cfg.lr_warmup_fraction is not None:
        warmup = cfg.lr_warmup_fraction * decay  # < decay: the config keeps the fraction below 1
    if warmup >= decay:
        unit = "iters" if schedule.train_samples is None else "samples"
        raise ConfigError(
            f"--lr-warmup-{unit} {getattr(cfg, f'lr_warmup_{unit}')} must be shorter than the decay "
            f"({decay:g} iterations: {flags['lr_decay_steps']}); shorten the warmup"
        )
    return dict(
        init_lr=0.0,  # Megatron's --lr-warmup-init default
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=wd_incr,
        wd_incr_style="constant",
    )


def scheduler_flags(schedule: ScheduleConfig) -> Dict[str, str]:
    """The flags behind each value of megatron's ``OptimizerParamScheduler.state_dict()`` (lengths in iterations)."""
    if schedule.train_samples is None:
        warmup = "--lr-warmup-iters or --lr-warmup-fraction"
        decay = "--lr-decay-iters, else --train-iters"
        wd_incr = "--train-iters"
    else:
        per = "in iterations of --global-batch-size"
        warmup = f"--lr-warmup-samples or --lr-warmup-fraction, {per}"
        decay = f"--lr-decay-samples, else --train-samples, {per}"
        wd_incr = f"--train-samples, {per}"
    return {
        "max_lr": "--lr",
        "min_lr": "--min-lr",
        "lr_decay_style": "--lr-decay-style",
        "lr_warmup_steps": f"warmup length ({warmup})",
        "lr_decay_steps": f"decay length ({decay})",
        "start_wd": "--weight-decay",
        "end_wd": "--weight-decay",
        "wd_incr_steps": f"weight-decay length ({wd_incr})",
        "wd_incr_style": "weight-decay style",
    }


def schedule_differences(
    saved: Dict[str, object], cfg: OptimizerConfig, schedule: ScheduleConfig
) -> List[Tuple[str, object, object]]:
    """(flag, checkpoint's value, this run's value) for each schedule value that differs and acts.

    ``saved``: a checkpoint's ``OptimizerParamScheduler.state_dict()`` (or the same keys from its
    job facts). Megatron compares every value; here two that cannot change the learning rate or the
    weight decay are skipped: the decay length and --min-lr when both decay styles are constant
    (megatron's constant style returns --lr after the warmup), and the weight-decay length when both
    weight-decay styles are constant (always here: --weight-decay is one value). Each flag is named
    once (--weight-decay sets the start and the end).
    """
    mine = scheduler_arguments(cfg, schedule)
    flags = scheduler_flags(schedule)
    both_constant = {
        "lr_decay_steps": ("lr_decay_style", "constant"),
        "min_lr": ("lr_decay_style", "constant"),
        "wd_incr_steps": ("wd_incr_style", "constant"),
    }
    out, named = [], set()
    for key, flag in flags.items():
        if key not in saved or flag in named:
            continue
        style = both_constant.get(key)
        if style and saved.get(style[0]) == style[1] == mine[style[0]]:
            continue
        if saved[key] != mine[key]:
            out.append((flag, saved[key], mine[key]))
            named.add(flag)
    return out


class Optimizer:
    """megatron-core's optimizer + OptimizerParamScheduler for one DDP-wrapped model (or this rank's
    DDP-wrapped model chunks, with virtual pipeline stages: one optimizer over all of them, as in Megatron).

    The trainer calls ``zero_grad()`` before every forward/backward (megatron's
    FP32Optimizer leaves ``param.grad`` aliased to ``main_grad`` after a step; without
    the reset the next backward would add the first micro-batch's gradient twice), then
    ``step()`` once per iteration.
    """

    def __init__(self, ddp_model, cfg: OptimizerConfig, *, bf16: bool, schedule: ScheduleConfig, fp16: bool = False):
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        with platform.megatron_cuda_calls_on_cpu():
            chunks = list(ddp_model) if isinstance(ddp_model, (list, tuple)) else [ddp_model]
            self.inner = get_megatron_optimizer(megatron_optimizer_config(cfg, bf16=bf16, fp16=fp16), chunks)
            # On load megatron's scheduler keeps the checkpoint's values (--use-checkpoint-opt_param-scheduler)
            # or takes this run's. Without either flag resume.check_schedule has refused any difference
            # that acts, so this run's values are then the checkpoint's.
            keep = cfg.use_checkpoint_opt_param_scheduler
            self.scheduler = OptimizerParamScheduler(
                self.inner,
                **scheduler_arguments(cfg, schedule),
                use_checkpoint_opt_param_scheduler=keep,
                override_opt_param_scheduler=not keep,
            )

    @property
    def lr(self) -> float:
        """The learning rate the next step applies (of the groups on the default schedule)."""
        groups = [g for g in self.inner.param_groups if g.get("default_config", True)] or self.inner.param_groups
        return float(groups[0]["lr"])

    def zero_grad(self) -> None:
        with platform.megatron_cuda_calls_on_cpu():
            self.inner.zero_grad()

    @property
    def loss_scale(self) -> float:
        """The factor the schedule multiplies each loss by (megatron's ``get_loss_scale``): the
        current fp16 loss scale, 1.0 for fp32 and bf16."""
        return float(self.inner.get_loss_scale())

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Megatron's ``config.grad_scale_func``: the loss times the current loss scale."""
        return self.inner.scale_loss(loss)

    def step(self) -> Optional[float]:
        """Clip, step, advance the schedule; returns the grad norm before clipping.

        Returns None when megatron skipped the step (Megatron's convention): with --fp16 the
        gradients overflowed at the current loss scale, so the weights, Adam's state and the LR
        schedule stay put and the dynamic loss scaler lowers the scale for the next step.
        """
        with platform.megatron_cuda_calls_on_cpu():
            update_successful, grad_norm, _ = self.inner.step()
        if not update_successful:
            return None
        self.scheduler.step(increment=1)
        return float("nan") if grad_norm is None else float(grad_norm)

    # ------------------------------------------------------------------ Adam's second moments (DGA)

    def adam_second_moments(self, params: List[torch.nn.Parameter]) -> Optional[Dict[str, object]]:
        """v and the bias correction for ``params`` (model parameters, in their order).

        Returns ``{"exp_avg_sq": [v per param], "bias_correction2": 1 - beta2^t}``, or
        None before the first step. v lives on the optimizer's fp32 main parameters: the
        model parameters themselves in fp32, their fp32 master copies with --bf16.

        Raises:
            ConfigError: with the distributed optimizer (each rank holds v for its shard only).
        """
        from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

        main_of: Dict[int, torch.Tensor] = {}
        owner: Dict[int, torch.optim.Optimizer] = {}
        for leaf in getattr(self.inner, "chained_optimizers", [self.inner]):
            if isinstance(leaf, DistributedOptimizer):
                raise ConfigError(
                    "--dga-preconditioner adam cannot be used with --use-distributed-optimizer: each rank "
                    "holds Adam's second moments for its own shard only; use --dga-preconditioner none"
                )
            if isinstance(leaf, Float16OptimizerWithFloat16Params):
                pairs = [
                    (m, f) for gm, gf in zip(leaf.float16_groups, leaf.fp32_from_float16_groups) for m, f in zip(gm, gf)
                ]
                pairs += [(p, p) for group in leaf.fp32_from_fp32_groups for p in group]
            else:  # FP32Optimizer: the model parameters are the main parameters
                pairs = [(p, p) for group in leaf.optimizer.param_groups for p in group["params"]]
            for model_param, main_param in pairs:
                main_of[id(model_param)] = main_param
                owner[id(model_param)] = leaf.optimizer
        # FusedAdam (TE/apex) keeps its step per group: one lookup table, not a scan of the groups per parameter.
        group_steps = {
            id(q): group["step"]
            for opt in set(owner.values())
            for group in opt.param_groups
            if "step" in group
            for q in group["params"]
        }
        v, steps = [], set()
        for p in params:
            main, opt = main_of[id(p)], owner[id(p)]
            state = opt.state.get(main, {})
            if "exp_avg_sq" not in state:
                return None  # before the first step
            v.append(state["exp_avg_sq"])
            steps.add(adam_step(state, group_steps.get(id(main)), type(opt).__name__))
        if len(steps) != 1:
            raise RuntimeError(f"Adam step counts differ between parameter groups: {sorted(steps)}")
        t = steps.pop()
        if t == 0:
            return None
        return {"exp_avg_sq": v, "bias_correction2": 1.0 - self.cfg.adam_beta2**t}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict:
        return {"optimizer": self.inner.state_dict(), "opt_param_scheduler": self.scheduler.state_dict()}

    def sharded_state_dict(self, model_sharded_state_dict: Dict, *, is_loading: bool, metadata: Dict) -> Dict:
        """Optimizer and scheduler entries of a megatron dist_checkpointing state dict.

        Loading into a DistributedOptimizer that has not stepped yet: its state_dict() needs
        Adam states to exist with torch's AdamW (megatron-core's optimizer without TE/apex),
        so they are allocated first with megatron's own dummy step; the load then overwrites
        parameters and states alike.
        """
        from megatron.core.optimizer import DistributedOptimizer

        with platform.megatron_cuda_calls_on_cpu():
            if is_loading:
                for leaf in getattr(self.inner, "chained_optimizers", [self.inner]):
                    if isinstance(leaf, DistributedOptimizer) and not leaf.optimizer.state:
                        leaf._init_optimizer_states_with_dummy_values()
            optimizer = self.inner.sharded_state_dict(model_sharded_state_dict, is_loading, metadata=metadata)
        return {"optimizer": optimizer, "opt_param_scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        # no_grad: megatron copies loaded values into main params that may be views of the
        # (grad-requiring) model params (fp32 with the distributed optimizer).
        with platform.megatron_cuda_calls_on_cpu(), torch.no_grad(), _loaded_states_keep_torch_adam_step(self.inner):
            self.inner.load_state_dict(state["optimizer"])
        _repair_torch_adam_steps(self.inner)
        self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self._apply_scheduler_lr_range()

    def _apply_scheduler_lr_range(self) -> None:
        """Give every parameter group the scheduler's peak and minimum LR, and re-apply the schedule.

        megatron-core's scheduler reads each group's own ``max_lr``/``min_lr`` (set from --lr/--min-lr
        when the optimizer is built), and loading the optimizer's state puts the checkpoint's back into
        the groups: without this a new --lr under --override-opt_param-scheduler would be ignored.
        No group here has its own LR (megatron's decoupled or per-parameter LRs are not used).
        """
        for group in self.inner.param_groups:
            group["max_lr"], group["min_lr"] = self.scheduler.max_lr, self.scheduler.min_lr
        self.scheduler.step(increment=0)  # the LR and weight decay of the loaded step, from those values

    def reload_model_params(self) -> None:
        """Copy the model's parameters into the optimizer's main (fp32 master) parameters.

        After loading model weights without the optimizer (--finetune, --no-load-optim), as
        Megatron does: the bf16 optimizer and the distributed optimizer hold master copies made
        from the initial weights, which the next step would otherwise write back into the model.
        """
        with platform.megatron_cuda_calls_on_cpu(), torch.no_grad():
            self.inner.reload_model_params()


@contextlib.contextmanager
def _loaded_states_keep_torch_adam_step(optimizer):
    """During a distributed-optimizer load, a loaded state without ``step`` keeps the current one.

    megatron-core's 'fully_reshardable' loader hands ``_set_main_param_and_optimizer_states``
    the saved tensors (param, exp_avg, exp_avg_sq), and that method copies into every key of
    the parameter's optimizer state. torch's AdamW (megatron-core's optimizer without TE/apex)
    also keeps a per-parameter ``step``, which the format does not save (it lives in the param
    groups, loaded just before): the copy would fail with KeyError 'step'. For the duration of
    the load, each such call gets the state's own ``step`` (a no-op copy); the group's value is
    then put in place by :func:`_repair_torch_adam_steps`. FusedAdam keeps no per-parameter
    step, so there this changes nothing.
    """
    from megatron.core.optimizer import DistributedOptimizer

    patched = []
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(leaf, DistributedOptimizer):
            continue
        original = leaf._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, leaf=leaf, original=original):
            group_index, group_order = leaf.model_param_group_index_map[model_param]
            main_param = leaf.optimizer.param_groups[group_index]["params"][group_order]
            state = leaf.optimizer.state.get(main_param, {})
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return original(model_param, tensors)

        leaf._set_main_param_and_optimizer_states = set_states  # this instance, this load only
        patched.append(leaf)
    try:
        yield
    finally:
        for leaf in patched:
            del leaf._set_main_param_and_optimizer_states


def _repair_torch_adam_steps(optimizer) -> None:
    """Give torch AdamW's parameters their own, correct step count after a distributed-optimizer load.

    megatron-core's DistributedOptimizer keeps torch's per-parameter ``step`` in its param
    groups (TE's FusedAdam keeps it there itself). Loaded through dist_checkpointing, the
    per-parameter tensors come back as the template's placeholder (1), or as one tensor
    shared by all parameters, which AdamW would increment once per parameter per step.
    Each parameter gets a fresh tensor holding its group's step. A no-op for FusedAdam
    (no per-parameter step) and for the other optimizers (no ``step`` in the groups).
    """
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in leaf.optimizer.param_groups:
            if "step" not in group or group["step"] is None:
                continue
            for param in group["params"]:
                state = leaf.optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def adam_step(state: dict, group_step, optimizer_name: str) -> int:
    """Adam's step count t of a parameter: torch keeps it in the parameter's state, TE/apex FusedAdam in
    its group (``group_step``: the group's "step", None when the group has none)."""
    if "step" in state:
        return int(state["step"])
    if group_step is not None:
        return int(group_step)
    raise RuntimeError(f"{optimizer_name} keeps no Adam step count where megatron-dga looks for it")
