"""Optimizer, learning-rate schedule and gradient norms.

CPU: torch AdamW over megatron DDP's fp32 ``main_grad`` buffers, with a global-norm clip
that counts tensor-parallel duplicates and tied weights once. GPU: megatron-core's own
optimizer (mixed precision, optional distributed optimizer), which does the same inside.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from megatron_dga.errors import ConfigError
from megatron_dga.training.config import OptimizerConfig


def lr_at(iteration: int, cfg: OptimizerConfig, train_iters: int) -> float:
    """Megatron's schedule: linear warmup to lr, then cosine/linear decay to min_lr."""
    if cfg.lr_warmup_iters and iteration < cfg.lr_warmup_iters:
        return cfg.lr * (iteration + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = (cfg.lr_decay_iters or train_iters) - cfg.lr_warmup_iters
    progress = min(max(iteration - cfg.lr_warmup_iters, 0) / max(decay_iters, 1), 1.0)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def counted_params(params) -> List[bool]:
    """For each parameter: does this rank count it in global sums (norms, alignments)?

    Tensor-parallel duplicates (e.g. layer norms, replicated on every TP rank) count on
    TP rank 0 only; tied copies (the output layer sharing the embedding on the last
    pipeline stage) are marked ``shared`` and count on the stage that owns them.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return [bool(param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)) for p in params]


def global_grad_norm(params, counted: List[bool], model_parallel_group) -> float:
    """L2 norm of the full (unsplit) gradient in main_grad, identical on every rank."""
    from megatron_dga import ops

    grads = [p.main_grad for p in params]
    sq = ops.grad_dot(grads, grads, counted=counted)
    if model_parallel_group is not None and torch.distributed.get_world_size(model_parallel_group) > 1:
        torch.distributed.all_reduce(sq, group=model_parallel_group)
    return math.sqrt(float(sq))


class CpuAdamW:
    """torch AdamW on megatron DDP's fp32 main_grad, with Megatron's decay rules and clipping."""

    def __init__(self, ddp_model, cfg: OptimizerConfig, model_parallel_group):
        params = [p for p in ddp_model.parameters() if p.requires_grad]
        if any(p.dtype != torch.float32 for p in params):
            raise ConfigError(
                "--bf16 needs megatron-core's mixed-precision optimizer, which runs on GPU only; "
                "drop --bf16 on CPU"
            )
        # As Megatron: no weight decay on biases and norm weights (1-D tensors).
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        self.params = params
        self.counted = counted_params(params)
        self.cfg = cfg
        self.mp_group = model_parallel_group
        self.inner = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Clip by the global norm and step; returns the norm before clipping."""
        norm = global_grad_norm(self.params, self.counted, self.mp_group)
        if not math.isfinite(norm):
            return norm  # skip the update, like Megatron's found-inf path
        scale = self.cfg.clip_grad / (norm + 1e-6) if self.cfg.clip_grad and norm > self.cfg.clip_grad else 1.0
        for p in self.params:
            p.grad = p.main_grad if scale == 1.0 else p.main_grad * scale
        self.inner.step()
        for p in self.params:
            p.grad = None
        return norm

    def exp_avg_sq(self) -> Optional[List[torch.Tensor]]:
        """Adam's second moments in parameter order (None before the first step)."""
        state = [self.inner.state.get(p, {}).get("exp_avg_sq") for p in self.params]
        return None if any(s is None for s in state) else state

    def bias_correction2(self) -> float:
        steps = [self.inner.state.get(p, {}).get("step") for p in self.params[:1]]
        step = float(steps[0]) if steps and steps[0] is not None else 0.0
        return 1.0 - self.cfg.adam_beta2**step if step else 1.0

    def state_dict(self) -> Dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.inner.load_state_dict(state)


class MegatronOptimizer:
    """megatron-core's optimizer (GPU): mixed precision, clipping and the distributed optimizer."""

    def __init__(self, ddp_model, cfg: OptimizerConfig, bf16: bool):
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        mcfg = McoreOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.cfg = cfg
        self.inner = get_megatron_optimizer(mcfg, [ddp_model])

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        _, grad_norm, _ = self.inner.step()
        return float("nan") if grad_norm is None else float(grad_norm)

    def exp_avg_sq(self):
        return None  # sharded/master-weight state: the adam preconditioner is CPU/non-distributed only for now

    def bias_correction2(self) -> float:
        return 1.0

    def state_dict(self) -> Dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.inner.load_state_dict(state)


def build_optimizer(ddp_model, cfg: OptimizerConfig, *, bf16: bool, model_parallel_group):
    if torch.cuda.is_available():
        return MegatronOptimizer(ddp_model, cfg, bf16)
    if cfg.use_distributed_optimizer:
        raise ConfigError("--use-distributed-optimizer needs GPUs (megatron-core's distributed optimizer); drop it on CPU")
    return CpuAdamW(ddp_model, cfg, model_parallel_group)
