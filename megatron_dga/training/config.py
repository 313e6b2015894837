"""Configs of the trainer's components: one dataclass each, validated on construction.

The CLI (``arguments.py``) builds these once; nothing reads a global args object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from megatron_dga.errors import ConfigError
from megatron_dga.model import GPTModelConfig
from megatron_dga.platform import ParallelConfig


def _check_finite_numbers(cfg) -> None:
    """Every float flag must be a finite number: --lr inf or --dga-eta nan fail at start-up."""
    import dataclasses
    import math

    for section in dataclasses.fields(cfg):
        component = getattr(cfg, section.name)
        for f in dataclasses.fields(component):
            values = getattr(component, f.name)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: List[str] = field(default_factory=list)
    """Megatron's --data-path: `W1 P1 W2 P2 ...` or plain shard prefixes (one per domain)."""
    specific_data_path: Optional[str] = None
    """Shard prefix of the small specific set whose gradient steers DGA (--specific-data-path)."""
    specific_eval_data_path: Optional[str] = None
    """Held-out split of the specific set, for the specific eval loss (--specific-eval-data-path)."""
    tokenizer_type: str = "SentencePieceTokenizer"
    """--tokenizer-type: SentencePieceTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer or NullTokenizer."""
    tokenizer_model: Optional[str] = None
    """--tokenizer-model (SentencePiece model file or HuggingFace directory)."""
    vocab_file: Optional[str] = None
    """--vocab-file (GPT-2 BPE)."""
    merge_file: Optional[str] = None
    """--merge-file (GPT-2 BPE)."""
    vocab_size: Optional[int] = None
    """--vocab-size (NullTokenizer only)."""
    split: str = "98,2"
    """--split TRAIN,VALID[,TEST]: per-domain document split (Megatron's convention, normalised);
    the VALID part gives the held-out per-domain eval loss. "100,0" evaluates on training samples."""
    domain_token_limit: Optional[List[int]] = None
    """--domain-token-limit: distinct tokens per domain (the paper's token-limited regime), one value
    for every domain or one per domain in --data-path order (0 = unlimited); a capped domain
    repeats a fixed subset of its samples epoch after epoch."""
    num_workers: int = 0
    """--num-workers: DataLoader worker processes (indices are always computed in the main process)."""

    def __post_init__(self):
        if not self.data_path:
            raise ConfigError("--data-path is required: give shard prefixes, e.g. --data-path data/web_text_document")
        self.train_fraction  # validates --split
        if isinstance(self.domain_token_limit, int):  # YAML or API callers may give one number
            self.domain_token_limit = [self.domain_token_limit]
        if self.domain_token_limit is not None and any(v < 0 for v in self.domain_token_limit):
            raise ConfigError(f"--domain-token-limit values must be >= 0 (0 = unlimited), got {self.domain_token_limit}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")


    @property
    def train_fraction(self) -> float:
        """Fraction of each domain's documents used for training (the rest is held out)."""
        try:
            parts = [float(x) for x in self.split.replace("/", ",").split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or parts[0] <= 0:
            raise ConfigError(f"--split must be like '98,2' (train,valid[,test] >= 0, train > 0), got {self.split!r}")
        return parts[0] / sum(parts)


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule (Megatron's flag names)."""

    lr: float = 3e-4
    """Peak learning rate (--lr)."""
    min_lr: float = 3e-5
    """Floor of the decay (--min-lr)."""
    lr_warmup_iters: int = 0
    """Linear warmup from 0 (--lr-warmup-iters)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which to decay (--lr-decay-iters); None means --train-iters."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """--lr-decay-style."""
    weight_decay: float = 0.01
    """--weight-decay (not applied to biases and norms, as in Megatron)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (--clip-grad); 0 disables."""
    adam_beta1: float = 0.9
    """--adam-beta1."""
    adam_beta2: float = 0.95
    """--adam-beta2."""
    adam_eps: float = 1e-8
    """--adam-eps."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (--use-distributed-optimizer), megatron-core's
    DistributedOptimizer; DGA then all-reduces (not reduce-scatters) its specific gradient."""

    def __post_init__(self):
        _positive(self, "lr")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}")
        if self.lr_warmup_iters < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("--lr-warmup-iters, --clip-grad and --weight-decay must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ScheduleConfig:
    """How long and in what batches the job trains, and how often it reports."""

    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank (--micro-batch-size)."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks (--global-batch-size); the rest is accumulation."""
    train_iters: int = 100
    """Optimizer steps (--train-iters)."""
    exit_interval: Optional[int] = None
    """Stop (after saving, with --save) when the iteration is a multiple of this (--exit-interval);
    the LR schedule still follows --train-iters, so a later --load continues the same run."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop with an error naming the iteration when the loss or the grad norm is not finite, before
    anything is saved (--check-for-nan-in-loss-and-grad, on by default as in Megatron;
    --no-check-for-nan-in-loss-and-grad trains on)."""
    exit_signal_handler: bool = False
    """On SIGTERM or SIGINT finish the current step, save (with --save) and exit 0 (--exit-signal-handler)."""
    exit_duration_in_mins: Optional[float] = None
    """Save (with --save) and exit 0 once this many minutes have passed since start-up
    (--exit-duration-in-mins), checked after every step."""
    log_interval: int = 10
    """Iterations between log lines (--log-interval)."""
    eval_interval: int = 50
    """Iterations between evaluations (--eval-interval); 0 disables."""
    eval_iters: int = 4
    """Micro-batches per domain (and of the specific eval set) per evaluation (--eval-iters)."""

    def __post_init__(self):
        _positive(self, "micro_batch_size", "global_batch_size", "train_iters", "log_interval")
        if self.exit_interval is not None and self.exit_interval <= 0:
            raise ConfigError(f"--exit-interval must be > 0, got {self.exit_interval}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        if self.eval_interval < 0 or self.eval_iters < 0:
            raise ConfigError("--eval-interval and --eval-iters must be >= 0")

    def num_micro_batches(self, dp_size: int) -> int:
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {dp_size} = {per_step}; use a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory to write checkpoints to (--save)."""
    load: Optional[str] = None
    """Directory to resume from (--load); its tracker file names the iteration."""
    ckpt_step: Optional[int] = None
    """Iteration to load instead of the one the tracker file names (--ckpt-step)."""
    save_interval: Optional[int] = None
    """Iterations between checkpoints (--save-interval); None saves only at the end."""
    keep_last: Optional[int] = 2
    """Checkpoints to keep (--keep-last, default 2): older iterations are deleted after each save."""
    ckpt_format: Literal["torch_dist", "torch"] = "torch_dist"
    """--ckpt-format: torch_dist (megatron-core dist_checkpointing: resumable on another TP/PP/DP
    layout, the distributed optimizer included) or torch (one file per model-parallel rank;
    TP and PP must stay the same). --load reads either."""
    reset_mixing_state: bool = False
    """--reset-mixing-state: resume model, optimizer and data stream, but start the mixing
    strategy afresh (required when --mixing differs from the checkpoint's)."""

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval <= 0:
            raise ConfigError(f"--save-interval must be > 0, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last <= 0:
            raise ConfigError(f"--keep-last must be > 0, got {self.keep_last}")
        if self.ckpt_format not in ("torch_dist", "torch"):
            raise ConfigError(f"--ckpt-format must be torch_dist or torch, got {self.ckpt_format!r}")


@dataclass
class LoggingConfig:
    """Where metrics go."""

    log_dir: Optional[str] = None
    """Directory of metrics.jsonl (--log-dir); defaults to --save, else ./runs/latest."""
    tensorboard_dir: Optional[str] = None
    """Tensorboard event files (--tensorboard-dir); none when unset."""


@dataclass
class MixingConfig:
    """How the domain weights are chosen. DGA fields only matter with --mixing dga."""

    mixing: str = "natural"
    """--mixing: uniform, natural, static, importance, dga."""
    static_weights: Optional[List[float]] = None
    """Weights from `--data-path W1 P1 ...` (used by --mixing static)."""
    importance_weights: Optional[str] = None
    """Weights file written by tools/importance_weights.py (--importance-weights)."""
    dga_interval: int = 10
    """T_r: training steps between weight updates (--dga-interval)."""
    dga_eta: float = 10.0
    """Mirror-descent step size on the alignments (--dga-eta)."""
    dga_ema: float = 0.1
    """beta of alpha_new = (1-beta) alpha + beta alpha_hat (--dga-ema); 1 disables the EMA.
    The paper's "EMA 0.1" read the other way round corresponds to 0.9 here."""
    dga_min_weight: float = 0.0
    """Floor c: alpha = (1-c) alpha + c/k keeps every domain alive (--dga-min-weight)."""
    dga_domain_batch_size: int = 8
    """b_dom: sequences per domain probe (--dga-domain-batch-size)."""
    dga_specific_batch_size: int = 16
    """b_spe: sequences of the specific set per update (--dga-specific-batch-size)."""
    dga_preconditioner: Literal["none", "adam"] = "none"
    """P in <g_i, P g_spe>: identity or Adam's diag(1/(sqrt(v_hat)+eps)) (--dga-preconditioner)."""
    dga_basis: Optional[str] = None
    """N x K basis file for distribution reweighting (--dga-basis)."""
    dga_init: str = "uniform"
    """Initial weights (--dga-init): uniform, natural, importance or a weights file."""
    dga_estimator: Literal["exact", "fd"] = "exact"
    """Alignment estimator (--dga-estimator): exact gradients, or finite differences along g_spe."""
    dga_fd_step: float = 1e-4
    """fd estimator step h relative to the parameter norm, h = dga_fd_step * |theta| (--dga-fd-step);
    1e-4 minimised the error against the exact estimator in fp32 (curvature above, rounding below)."""

    def __post_init__(self):
        if self.dga_interval <= 0:
            raise ConfigError(f"--dga-interval must be > 0, got {self.dga_interval}")
        if not 0 <= self.dga_eta < float("inf"):
            raise ConfigError(f"--dga-eta must be a finite number >= 0 (the mirror-descent step size), got {self.dga_eta}")
        if not 0 < self.dga_ema <= 1:
            raise ConfigError(f"--dga-ema must be in (0, 1] (1 = no EMA), got {self.dga_ema}")
        if not 0 <= self.dga_min_weight < 1:
            raise ConfigError(f"--dga-min-weight must be in [0, 1), got {self.dga_min_weight}")
        if self.dga_domain_batch_size <= 0 or self.dga_specific_batch_size <= 0:
            raise ConfigError("--dga-domain-batch-size and --dga-specific-batch-size must be > 0")
        if self.dga_preconditioner not in ("none", "adam"):
            raise ConfigError(f"--dga-preconditioner must be none or adam, got {self.dga_preconditioner!r}")
        if not self.dga_fd_step > 0:
            raise ConfigError(f"--dga-fd-step must be > 0, got {self.dga_fd_step}")
        if self.dga_estimator not in ("exact", "fd"):
            raise ConfigError(f"--dga-estimator must be exact or fd, got {self.dga_estimator!r}")


@dataclass
class PretrainConfig:
    """Everything one pretraining job needs."""

    model: GPTModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    mixing: MixingConfig

    def __post_init__(self):
        _check_finite_numbers(self)
        if self.optimizer.use_distributed_optimizer and self.checkpoint.ckpt_format == "torch" and self.checkpoint.save:
            raise ConfigError(
                "--use-distributed-optimizer with --ckpt-format torch would lose the sharded optimizer state; "
                "save with --ckpt-format torch_dist (the default)"
            )
        if (self.mixing.mixing == "dga" and self.mixing.dga_preconditioner == "adam"
                and self.optimizer.use_distributed_optimizer):
            raise ConfigError(
                "--dga-preconditioner adam cannot be combined with --use-distributed-optimizer: each rank "
                "holds Adam's second moments for its own shard only; use --dga-preconditioner none or drop "
                "--use-distributed-optimizer"
            )
