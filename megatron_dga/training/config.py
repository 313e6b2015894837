"""Configs of the trainer's components: one dataclass each, validated on construction.

The CLI (``arguments.py``) builds these once; nothing reads a global args object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from megatron_dga.data.domains import parse_data_path, read_data_args_file, read_per_split_data_args
from megatron_dga.config_checks import ReadOnlyOnceParsed, refuse_without
from megatron_dga.errors import ConfigError
from megatron_dga.mixing.config import MixingConfig, check_job
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


SCHEDULER_RESUME_FLAGS = {
    "override_opt_param_scheduler": "--override-opt_param-scheduler",
    "use_checkpoint_opt_param_scheduler": "--use-checkpoint-opt_param-scheduler",
}
"""OptimizerConfig fields whose flags keep Megatron-LM's spelling (an underscore in 'opt_param')."""


def _flag(name: str) -> str:
    return SCHEDULER_RESUME_FLAGS.get(name) or "--" + name.replace("_", "-")


def _refuse_without(given: Dict[str, Any], needed: str, consequence: str, add: Optional[str] = None) -> None:
    """:func:`megatron_dga.config_checks.refuse_without` with this module's flag spellings."""
    refuse_without(given, needed, consequence, add, flag=_flag)


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value!r}")


DEFAULT_SPLIT = "98,2"
"""--split when not given."""


@dataclass
class DataConfig(ReadOnlyOnceParsed):
    """Where the tokens come from: exactly one of --data-path, --data-args-path,
    --per-split-data-args-path and --mock-data (Megatron's choices)."""

    data_path: List[str] = field(default_factory=list)
    """Megatron's --data-path: `W1 P1 W2 P2 ...` or plain shard prefixes (one per domain)."""
    domain_map: Optional[str] = None
    """--domain-map FILE: a fine-domain map (written by tools/cluster_domains.py --input-shards ... --output-map
    FILE) giving every document of the --data-path shards its fine domain. Each fine domain (the map's K, up to
    hundreds of thousands) is then a training domain, its samples packed from its own documents only, and
    --split applies per fine domain. --data-path must list exactly the map's shards (any order) as plain
    prefixes: the map defines the domains. See megatron_dga/data/README.md, "Fine domains from a map"."""
    data_args_path: Optional[str] = None
    """--data-args-path FILE: a file holding the --data-path value (Megatron's format: `W1 P1 W2 P2 ...`
    or prefixes, separated by any whitespace), for mixtures too long for a command line."""
    per_split_data_args_path: Optional[str] = None
    """--per-split-data-args-path FILE: Megatron's JSON {"train": [...], "valid": [...], "test": [...]}, each
    a --data-path value (a list, or one string). "train" gives the training domains, used whole (no
    --split). "valid" gives their held-out eval sets: plain prefixes naming the same domains as
    "train" (matched by name, any order), or null/[] to evaluate on training samples; anything else
    is an error. A non-empty "test" is an error (this trainer runs no test evaluation)."""
    mock_data: bool = False
    """--mock-data: synthetic data for smoke tests (Megatron's flag): three Markov-chain domains
    mock0..mock2 and a specific set mock_specific (half mock0, half mock1; used as
    --specific-data-path unless that is given), documents of --seq-length tokens with ids below the
    tokenizer's vocabulary (e.g. --tokenizer-type NullTokenizer --vocab-size 127), written to a
    temporary directory at start-up, the same on every rank for the same --seed."""
    data_cache_path: Optional[str] = None
    """--data-cache-path DIR: where megatron-core caches each domain's GPTDataset indices (document,
    sample and shuffle .npy files, named after a hash of the shard path, --split part, --seed,
    --seq-length and tokenizer), as in Megatron: the first run writes them, later runs on the same
    data load them instead of rebuilding. Unset: built in memory at every start-up. Rank 0 writes,
    the other ranks read: DIR must be on a filesystem every node sees. A shard rewritten in place
    keeps its cache entry: clear DIR after re-running preprocessing."""
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
    split: str = DEFAULT_SPLIT
    """--split TRAIN,VALID[,TEST]: per-domain document split (Megatron's convention, normalised);
    the VALID part gives the held-out per-domain eval loss. "100,0" evaluates on training samples.
    Not with --per-split-data-args-path (its "valid" shards are the held-out part)."""
    domain_token_limit: Optional[List[int]] = None
    """--domain-token-limit: distinct tokens per domain (the paper's token-limited regime), one value
    for every domain or one per domain in --data-path order (0 = unlimited); a capped domain
    repeats a fixed subset of its samples epoch after epoch."""
    num_workers: int = 0
    """--num-workers: DataLoader worker processes (indices are always computed in the main process)."""

    def __post_init__(self):
        self._resolve_data_source()
        _ = self.train_fraction  # the property raises for an invalid --split
        if isinstance(self.domain_token_limit, int):  # YAML or API callers may give one number
            self.domain_token_limit = [self.domain_token_limit]
        if self.domain_token_limit is not None and any(v < 0 for v in self.domain_token_limit):
            raise ConfigError(
                f"--domain-token-limit values must be >= 0 (0 = unlimited), got {self.domain_token_limit}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.domain_map is not None:
            self._check_domain_map()

    def _check_domain_map(self) -> None:
        """--domain-map needs the map's shards as plain --data-path prefixes; the flags it replaces are errors."""
        import os

        where = f"--domain-map {self.domain_map}"
        if self.mock_data:
            raise ConfigError(
                f"{where} with --mock-data: the mock shards are written at start-up and no map fits them; "
                "give the map's shards with --data-path, or drop --domain-map"
            )
        if not os.path.isfile(self.domain_map):
            raise ConfigError(
                f"{where}: no such file; write one with tools/cluster_domains.py --input-shards PREFIX "
                "[PREFIX ...] --output-map FILE"
            )
        if parse_data_path(self.data_path)[2] is not None:
            raise ConfigError(
                f"{where} with weights in --data-path: the map defines the domains (its fine domains, not the shards), "
                "so shard weights cannot apply; give the shards as plain prefixes, and static weights over the fine "
                "domains as a weights file (--mixing importance --importance-weights FILE, or --mixing dga "
                "--dga-init FILE)"
            )
        if self.per_split_data_args_path and self.per_split_valid_prefixes is not None:
            raise ConfigError(
                f"{where} with --per-split-data-args-path {self.per_split_data_args_path} giving \"valid\" shards: "
                "the map covers the training shards only, so their fine domains have no held-out shards; use "
                "--data-path with --split (applied per fine domain), or set \"valid\" to []"
            )
        if self.domain_token_limit and len(self.domain_token_limit) > 1:
            raise ConfigError(
                f"{where} with {len(self.domain_token_limit)} --domain-token-limit values: with a map give one value, "
                "applied to every fine domain"
            )

    def _resolve_data_source(self) -> None:
        """Exactly one source of training data; a data-args file's value becomes data_path.

        A resolved config (data_path read from the file) validates again: the file's value
        is not a second source.
        """
        from_file, splits = None, None
        if self.data_args_path:
            from_file = read_data_args_file(self.data_args_path)
        elif self.per_split_data_args_path:
            splits = read_per_split_data_args(self.per_split_data_args_path)
            from_file = splits["train"]
        given = [
            (flag, value)
            for flag, value in (
                ("--data-path", " ".join(self.data_path) if self.data_path and self.data_path != from_file else None),
                ("--data-args-path", self.data_args_path),
                ("--per-split-data-args-path", self.per_split_data_args_path),
                ("--mock-data", "" if self.mock_data else None),
            )
            if value is not None
        ]
        if len(given) > 1:
            shown = " and ".join(
                f"{flag} {value}".rstrip() if len(value) <= 60 else f"{flag} {value[:57]}..." for flag, value in given
            )
            raise ConfigError(f"{shown} each give the training data (Megatron takes one of them); keep one")
        if not given:
            raise ConfigError(
                "--data-path is required: give shard prefixes, e.g. --data-path data/web_text_document "
                "(or --data-args-path FILE, --per-split-data-args-path FILE, or --mock-data)"
            )
        if splits is not None:
            self._check_per_split(splits)
        if from_file is not None:
            self.data_path = from_file

    def _check_per_split(self, splits: Dict[str, Optional[List[str]]]) -> None:
        """The "valid" shards must name the "train" domains, without weights; "test" and --split would be ignored."""
        where = f"--per-split-data-args-path {self.per_split_data_args_path}"
        if self.split != DEFAULT_SPLIT:
            raise ConfigError(
                f"--split {self.split} with {where}: each split comes from its own shards there, so "
                "--split would be ignored; drop --split"
            )
        if splits["test"]:
            raise ConfigError(
                f"{where}: \"test\" gives {' '.join(splits['test'])[:60]}, but this trainer runs no test "
                "evaluation (it would be ignored); set \"test\" to [] or remove it"
            )
        if splits["valid"]:
            train_names = parse_data_path(splits["train"])[0]
            names, _, weights = parse_data_path(splits["valid"])
            if weights is not None:
                raise ConfigError(
                    f"{where}: \"valid\" gives weights, but the eval loss is reported per domain (the "
                    "weights would be ignored); list the prefixes only"
                )
            if sorted(names) != sorted(train_names):
                raise ConfigError(
                    f"{where}: \"valid\" names domains {names}, \"train\" {train_names}; the held-out sets are the "
                    "per-domain eval sets, matched by name (a shard's basename without _text_document): give one "
                    "per training domain, or [] to evaluate on training samples"
                )

    @property
    def per_split_valid_prefixes(self) -> Optional[List[str]]:
        """The held-out shards of --per-split-data-args-path, in the order of the training domains
        (None without that flag or with an empty "valid")."""
        if not self.per_split_data_args_path:
            return None
        valid = read_per_split_data_args(self.per_split_data_args_path)["valid"]
        if not valid:
            return None
        by_name = dict(zip(*parse_data_path(valid)[:2]))
        return [by_name[name] for name in parse_data_path(self.data_path)[0]]

    @property
    def train_fraction(self) -> float:
        """Fraction of each domain's documents used for training (the rest is held out)."""
        if self.per_split_data_args_path:
            return 1.0  # Megatron's per-split blends: each split is whole shards
        try:
            parts = [float(x) for x in self.split.replace("/", ",").split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or parts[0] <= 0:
            raise ConfigError(f"--split must be like '98,2' (train,valid[,test] >= 0, train > 0), got {self.split!r}")
        return parts[0] / sum(parts)


LOSS_SCALE_FLAGS = ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
"""OptimizerConfig fields of fp16 loss scaling (megatron-core's OptimizerConfig fields of the same names)."""


@dataclass
class OptimizerConfig(ReadOnlyOnceParsed):
    """AdamW and the learning-rate schedule (Megatron's flag names)."""

    lr: float = 3e-4
    """Peak learning rate (--lr)."""
    min_lr: float = 3e-5
    """Floor of the decay (--min-lr)."""
    lr_warmup_iters: int = 0
    """Linear warmup from 0 (--lr-warmup-iters)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which to decay (--lr-decay-iters); None means --train-iters."""
    lr_warmup_fraction: Optional[float] = None
    """--lr-warmup-fraction F: warm up over F x the decay length (Megatron's alternative to
    --lr-warmup-iters/--lr-warmup-samples, an error together with them); 0 <= F < 1."""
    lr_warmup_samples: int = 0
    """--lr-warmup-samples: linear warmup over this many samples (with --train-samples only, as in Megatron)."""
    lr_decay_samples: Optional[int] = None
    """--lr-decay-samples: samples over which to decay (with --train-samples only); None means
    --train-samples."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from --lr to --min-lr after warm-up: cosine, linear or constant."""
    weight_decay: float = 0.01
    """--weight-decay (not applied to biases and norms, as in Megatron)."""
    override_opt_param_scheduler: bool = False
    """--override-opt_param-scheduler: on resume, this run's --lr, --min-lr, --lr-decay-style,
    --weight-decay and warmup/decay lengths replace the checkpoint's (Megatron's flag). The lengths
    are recomputed from this run's flags as if it had been planned so from iteration 0, and the
    iteration count continues: e.g. --train-iters 8 on a checkpoint saved at 4 of 4 continues at
    iteration 4 of an 8-iteration decay. Without this flag or --use-checkpoint-opt_param-scheduler a
    resume whose schedule differs from the checkpoint's is refused before anything is loaded."""
    use_checkpoint_opt_param_scheduler: bool = False
    """--use-checkpoint-opt_param-scheduler: on resume, keep the checkpoint's learning-rate and
    weight-decay schedule (peak and minimum LR, decay style, warmup and decay lengths, weight
    decay), whatever this run's flags say (Megatron's flag; run_info.json records the values used)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (--clip-grad); 0 disables."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay (beta1)."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay (beta2); DGA's preconditioner reads these moments."""
    adam_eps: float = 1e-8
    """Adam's epsilon, added to the square root of the second moment."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (--use-distributed-optimizer), megatron-core's
    DistributedOptimizer; DGA then all-reduces (not reduce-scatters) its specific gradient."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (--overlap-grad-reduce):
    megatron-core's DDP splits its grad buffers into buckets (--ddp-bucket-size) and starts each
    bucket's all-reduce (reduce-scatter with --use-distributed-optimizer) as soon as the last
    micro-batch's backward has filled it. Same gradients and losses; DGA's domain probes still keep
    their local gradients (the whole probe runs under megatron's no_sync)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass
    (--overlap-param-gather): after a step each rank holds only its shard of the new parameters,
    and megatron-core's forward pre-hooks gather them bucket by bucket (checkpoints gather first).
    Needs --use-distributed-optimizer and --overlap-grad-reduce, as in Megatron."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket with --overlap-grad-reduce (--ddp-bucket-size;
    default megatron-core's max(40M, 1M x data-parallel size)). Without --overlap-grad-reduce
    megatron-core reduces each grad buffer whole, so the flag is an error there."""
    loss_scale: Optional[float] = None
    """Static loss scale with --fp16 (--loss-scale; a power of 2 such as 4096 works best). Unset:
    dynamic loss scaling (Megatron's default), tuned by the four flags below. --fp16 only."""
    initial_loss_scale: Optional[float] = None
    """First scale of dynamic loss scaling (--initial-loss-scale, default 2^32). --fp16 only."""
    min_loss_scale: Optional[float] = None
    """Floor of dynamic loss scaling (--min-loss-scale, default 1). --fp16 only."""
    loss_scale_window: Optional[float] = None
    """Steps without overflow after which dynamic loss scaling doubles the scale (--loss-scale-window,
    default 1000). --fp16 only."""
    hysteresis: Optional[int] = None
    """Overflowing (skipped) steps tolerated before dynamic loss scaling halves the scale
    (--hysteresis, default 2). --fp16 only."""

    def __post_init__(self):
        _positive(self, "lr")
        self._check_overlap()
        for name in LOSS_SCALE_FLAGS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        dynamic = {k: getattr(self, k) for k in LOSS_SCALE_FLAGS[1:] if getattr(self, k) is not None}
        if self.loss_scale is not None and dynamic:
            names = ", ".join(f"{_flag(k)} {v}" for k, v in dynamic.items())
            one = len(dynamic) == 1
            raise ConfigError(
                f"{names} {'tunes' if one else 'tune'} dynamic loss scaling, which --loss-scale "
                f"{self.loss_scale} turns off (a static scale); drop --loss-scale or drop "
                f"{'it' if one else 'them'}"
            )
        # megatron-core's defaults (OptimizerConfig): its grad scaler asserts min <= initial.
        initial = 2.0**32 if self.initial_loss_scale is None else self.initial_loss_scale
        floor = 1.0 if self.min_loss_scale is None else self.min_loss_scale
        if floor > initial:
            given = lambda name, value, default: f"--{name} {value:g}" + ("" if default else " (the default)")
            raise ConfigError(
                f"{given('min-loss-scale', floor, self.min_loss_scale is not None)} is above "
                f"{given('initial-loss-scale', initial, self.initial_loss_scale is not None)}: dynamic loss "
                "scaling starts at the initial scale and never goes below the minimum; give --min-loss-scale <= "
                "--initial-loss-scale"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-decay-style must be cosine, linear or constant, got {self.lr_decay_style!r}")
        if self.lr_warmup_iters < 0 or self.lr_warmup_samples < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("--lr-warmup-iters, --lr-warmup-samples, --clip-grad and --weight-decay must be >= 0")
        if self.lr_decay_samples is not None and self.lr_decay_samples <= 0:
            raise ConfigError(f"--lr-decay-samples must be > 0, got {self.lr_decay_samples}")
        if self.lr_warmup_fraction is not None:
            if not 0 <= self.lr_warmup_fraction < 1:
                raise ConfigError(
                    f"--lr-warmup-fraction must be in [0, 1) (a fraction of the decay length), "
                    f"got {self.lr_warmup_fraction}"
                )
            for name in ("lr_warmup_iters", "lr_warmup_samples"):
                if getattr(self, name):
                    raise ConfigError(
                        f"--lr-warmup-fraction {self.lr_warmup_fraction} and {_flag(name)} "
                        f"{getattr(self, name)} both set the warmup (Megatron takes one); keep one"
                    )
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError(
                "--override-opt_param-scheduler (this run's LR schedule wins) and "
                "--use-checkpoint-opt_param-scheduler (the checkpoint's wins) contradict each "
                "other; keep one"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")

    def _check_overlap(self) -> None:
        """Megatron's rules for the overlap flags; a flag that would do nothing is an error."""
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError(
                "--overlap-param-gather overlaps the distributed optimizer's parameter all-gather, "
                "and --use-distributed-optimizer is not given (without it every rank updates "
                "whole parameters: nothing to gather); add --use-distributed-optimizer or drop "
                "--overlap-param-gather"
            )
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError(
                "--overlap-param-gather needs --overlap-grad-reduce (Megatron's rule: the "
                "parameter all-gather is overlapped only together with the gradient "
                "reduce-scatter); add --overlap-grad-reduce"
            )
        if self.ddp_bucket_size is not None and self.ddp_bucket_size <= 0:
            raise ConfigError(f"--ddp-bucket-size must be > 0 (parameters per bucket), got {self.ddp_bucket_size}")
        if not self.overlap_grad_reduce:
            _refuse_without(
                {"ddp_bucket_size": self.ddp_bucket_size} if self.ddp_bucket_size is not None else {},
                "--overlap-grad-reduce",
                "megatron-core reduces each grad buffer as one bucket",
            )


@dataclass
class ScheduleConfig(ReadOnlyOnceParsed):
    """How long and in what batches the job trains, and how often it reports."""

    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank (--micro-batch-size)."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks (--global-batch-size); the rest is accumulation."""
    train_iters: Optional[int] = None
    """Optimizer steps (--train-iters); 100 when neither it nor --train-samples is given."""
    train_samples: Optional[int] = None
    """--train-samples N: train on N samples instead of a number of iterations (Megatron's sample-based
    training, an error together with --train-iters): N // --global-batch-size iterations (the last
    partial batch is dropped, as in Megatron), and the LR schedule counts samples (--lr-warmup-samples,
    --lr-decay-samples or --lr-warmup-fraction; the *-iters flags are errors with it)."""
    rampup_batch_size: Optional[List[int]] = None
    """--rampup-batch-size START INCR SAMPLES (Megatron: grow the global batch size from START by INCR
    over SAMPLES samples): refused. The mixture sampler draws every global batch at --global-batch-size
    (its per-domain allocation carries a deficit between batches of that size, saved in checkpoints),
    and DGA's updates assume that constant batch."""
    exit_interval: Optional[int] = None
    """Save and stop when the iteration is a multiple of this (--exit-interval); the LR schedule
    still follows --train-iters, so a later --load continues the same run. Needs --save (without
    it the run would stop with nothing to resume from: an error; lower --train-iters instead)."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop with an error naming the iteration when the loss or the grad norm is not finite, before
    anything is saved (--check-for-nan-in-loss-and-grad, on by default as in Megatron;
    --no-check-for-nan-in-loss-and-grad trains on)."""
    exit_signal_handler: bool = False
    """On SIGTERM or SIGINT finish the current step, save and exit 0 (--exit-signal-handler).
    Needs --save (an error without it: a preempted run would leave nothing to resume from)."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit 0 once this many minutes have passed since start-up (--exit-duration-in-mins),
    checked after every step. Needs --save (an error without it)."""
    log_interval: int = 10
    """Iterations between log lines (--log-interval)."""
    eval_interval: int = 50
    """Iterations between evaluations (--eval-interval); 0 disables."""
    eval_iters: int = 4
    """Micro-batches per domain (and of the specific eval set) per evaluation (--eval-iters)."""

    def __post_init__(self):
        _positive(self, "micro_batch_size", "global_batch_size", "log_interval")
        if self.rampup_batch_size is not None:
            raise ConfigError(
                f"--rampup-batch-size {' '.join(map(str, self.rampup_batch_size))}: ramping up the global batch "
                f"size is not supported; every global batch is drawn at --global-batch-size {self.global_batch_size} "
                "(the mixture sampler's per-domain allocation, its checkpointed state and DGA's updates assume one "
                "batch size); drop --rampup-batch-size and train with a constant --global-batch-size"
            )
        if self.train_samples is not None:
            _positive(self, "train_samples")
            iters = self.train_samples // self.global_batch_size
            # A resolved config (train_iters filled in from train_samples) validates again.
            if self.train_iters not in (None, iters):
                raise ConfigError(
                    f"--train-iters {self.train_iters} and --train-samples {self.train_samples} both set "
                    "the length of the run (Megatron takes one); keep one"
                )
            if iters == 0:
                raise ConfigError(
                    f"--train-samples {self.train_samples} is less than one --global-batch-size "
                    f"{self.global_batch_size}: no step would run; give at least "
                    f"{self.global_batch_size}"
                )
            self.train_iters = iters
        elif self.train_iters is None:
            self.train_iters = 100
        _positive(self, "train_iters")
        if self.exit_interval is not None and self.exit_interval <= 0:
            raise ConfigError(f"--exit-interval must be > 0, got {self.exit_interval}")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ConfigError(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        if self.eval_interval < 0 or self.eval_iters < 0:
            raise ConfigError("--eval-interval and --eval-iters must be >= 0")

    def num_micro_batches(self, dp_size: int) -> int:
        """Megatron's GBS = MBS * DP * num_micro_batches (the one rule: ``data.sampler.check_batch_geometry``)."""
        from megatron_dga.data.sampler import check_batch_geometry

        return check_batch_geometry(self.global_batch_size, self.micro_batch_size, dp_size)


@dataclass
class CheckpointConfig(ReadOnlyOnceParsed):
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory to write checkpoints to (--save); created and checked writable at start-up."""
    load: Optional[str] = None
    """Directory to resume from (--load); its tracker file names the iteration."""
    ckpt_step: Optional[int] = None
    """Iteration to load instead of the one the tracker file names (--ckpt-step)."""
    save_interval: Optional[int] = None
    """Iterations between checkpoints (--save-interval); unset saves only at the end. Needs --save."""
    keep_last: Optional[int] = None
    """Checkpoints to keep (--keep-last, default 2): older iterations are deleted after each save.
    Needs --save."""
    ckpt_format: Optional[Literal["torch_dist", "torch"]] = None
    """--ckpt-format: torch_dist (the default; megatron-core dist_checkpointing: resumable on another
    TP/PP/DP layout, the distributed optimizer included) or torch (one file per model-parallel rank;
    TP and PP must stay the same). Chooses how --save writes (so it needs --save); --load reads either."""
    reset_mixing_state: bool = False
    """--reset-mixing-state: resume model, optimizer and data stream, but start the mixing
    strategy afresh (required when --mixing differs from the checkpoint's). Needs --load."""
    finetune: bool = False
    """--finetune: load the model weights only from --load and start at iteration 0 with a fresh
    optimizer, LR schedule, RNG, data stream and mixing state (Megatron's meaning). The domains,
    --data-path and --mixing may differ from the checkpoint's (a new mixture over new data); the
    model shape may not. Needs --load."""
    load_optim: bool = True
    """--no-load-optim: resume the iteration, model, RNG, data stream and mixing state from --load,
    but start a fresh optimizer (no Adam moments) and LR schedule (warmup and decay restart), as in
    Megatron; --use-distributed-optimizer may then differ from the checkpoint's. Needs --load."""
    load_rng: bool = True
    """--no-load-rng: resume from --load without restoring its random-number generator states
    (they restart from --seed), as in Megatron. Needs --load."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """--dist-ckpt-optim-fully-reshardable: save the distributed optimizer's state per model
    parameter (megatron's 'fully_reshardable'), so a resume may change TP and PP too; the save
    first gathers the state over the data-parallel ranks. Off: Megatron's default
    'dp_reshardable' (faster; a resume may change DP only)."""
    distrib_optim_fully_reshardable_mem_efficient: bool = False
    """--distrib-optim-fully-reshardable-mem-efficient: with --dist-ckpt-optim-fully-reshardable,
    gather the optimizer state on data-parallel rank 0 only, over gloo (less memory, slower save)."""

    def __post_init__(self):
        # Flags that only act with --save/--load are errors without them, never silently dropped.
        if not self.save:
            resolved_defaults = {
                "save_interval": None,
                "keep_last": 2,
                "ckpt_format": "torch_dist",
                "dist_ckpt_optim_fully_reshardable": False,
                "distrib_optim_fully_reshardable_mem_efficient": False,
            }
            _refuse_without(
                {
                    k: getattr(self, k)
                    for k, default in resolved_defaults.items()
                    if getattr(self, k) not in (None, default)
                },
                "--save",
                "nothing is saved",
                "--save DIR",
            )
        if not self.load:
            _refuse_without(
                {
                    k: v
                    for k, v in (
                        ("ckpt_step", self.ckpt_step),
                        ("reset_mixing_state", self.reset_mixing_state or None),
                        ("finetune", self.finetune or None),
                        ("no_load_optim", (not self.load_optim) or None),
                        ("no_load_rng", (not self.load_rng) or None),
                    )
                    if v is not None
                },
                "--load",
                "nothing is resumed",
                "--load DIR",
            )
        if self.finetune:
            redundant = [
                flag
                for flag, on in (
                    ("--no-load-optim", not self.load_optim),
                    ("--no-load-rng", not self.load_rng),
                    ("--reset-mixing-state", self.reset_mixing_state),
                )
                if on
            ]
            if redundant:
                one = len(redundant) == 1
                raise ConfigError(
                    f"{', '.join(redundant)} with --finetune, which loads the model weights only (a "
                    "fresh optimizer, LR schedule, RNG, data stream and mixing state): "
                    f"{'it has' if one else 'they have'} no effect; drop {'it' if one else 'them'}"
                )
        if self.distrib_optim_fully_reshardable_mem_efficient and not self.dist_ckpt_optim_fully_reshardable:
            raise ConfigError(
                "--distrib-optim-fully-reshardable-mem-efficient acts with "
                "--dist-ckpt-optim-fully-reshardable only; add it or drop the flag"
            )
        self.keep_last = 2 if self.keep_last is None else self.keep_last
        self.ckpt_format = self.ckpt_format or "torch_dist"
        if self.save_interval is not None and self.save_interval <= 0:
            raise ConfigError(f"--save-interval must be > 0, got {self.save_interval}")
        if self.keep_last is not None and self.keep_last <= 0:
            raise ConfigError(f"--keep-last must be > 0, got {self.keep_last}")
        if self.ckpt_format not in ("torch_dist", "torch"):
            raise ConfigError(f"--ckpt-format must be torch_dist or torch, got {self.ckpt_format!r}")


@dataclass
class LoggingConfig(ReadOnlyOnceParsed):
    """Where metrics go."""

    log_dir: Optional[str] = None
    """Directory of metrics.jsonl and run_info.json (--log-dir); defaults to --save, else a new
    runs/<date-time>-<id> per run (printed at start-up). Checked writable at start-up. A run that
    does not resume (no --load) never overwrites another run's logs: an earlier run's
    metrics.jsonl and run_info.json found there are moved to previous_runs/<date-time>/ inside it
    (with a warning); with --load, the entries past the resumed iteration are dropped (the
    original kept as metrics.jsonl.bak)."""
    tensorboard_dir: Optional[str] = None
    """Tensorboard event files (--tensorboard-dir); none when unset. Like Megatron, a run adds its
    own event file to the directory and never deletes others (where steps overlap, TensorBoard
    shows the newest run's). Checked writable at start-up."""
    wandb_project: Optional[str] = None
    """Weights & Biases project (--wandb-project): the logging rank also sends every TensorBoard
    scalar (same tags) to a W&B run. Needs the optional client: pip install 'megatron-dga[wandb]'.
    WANDB_MODE=offline writes the run locally, without a network (upload it with `wandb sync`)."""
    wandb_exp_name: Optional[str] = None
    """W&B run name (--wandb-exp-name); default the log directory's name. Needs --wandb-project."""
    wandb_save_dir: Optional[str] = None
    """Directory W&B writes its wandb/ folder of run files into (--wandb-save-dir); default the log
    directory. Checked writable at start-up. Needs --wandb-project."""
    log_domains_limit: int = 64
    """--log-domains-limit N: per-domain lists (weights, samples, epochs, alignments, eval losses) longer than
    N are logged as a summary instead of one value per domain: metrics.jsonl gets the entropy, the effective
    number of domains exp(H), the 10 largest entries by name, the count of non-zero entries and, with a
    hierarchical domain map, the mass per top-level cluster; TensorBoard and W&B get summary scalars only
    (e.g. mixing/weight_entropy, mixing/weight_top1). Keeps logs readable with thousands of fine domains."""

    def __post_init__(self):
        if not isinstance(self.log_domains_limit, int) or self.log_domains_limit < 1:
            raise ConfigError(f"--log-domains-limit must be a positive integer, got {self.log_domains_limit!r}")
        if not self.wandb_project:
            _refuse_without(
                {
                    k: v
                    for k, v in (("wandb_exp_name", self.wandb_exp_name), ("wandb_save_dir", self.wandb_save_dir))
                    if v
                },
                "--wandb-project",
                "nothing is sent to W&B",
                "--wandb-project NAME",
            )
            return
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            from megatron_dga.training.metrics import wandb_missing

            raise ConfigError(wandb_missing(self.wandb_project))


@dataclass
class PretrainConfig(ReadOnlyOnceParsed):
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
        if self.checkpoint.dist_ckpt_optim_fully_reshardable and not self.optimizer.use_distributed_optimizer:
            raise ConfigError(
                "--dist-ckpt-optim-fully-reshardable chooses the distributed optimizer's checkpoint format, and "
                "--use-distributed-optimizer is not given (the other optimizers' checkpoints always reshard over "
                "TP, PP and DP); add --use-distributed-optimizer or drop the flag"
            )
        # A malformed --data-path fails here, before anything is built; its weights settle --mixing.
        # (--mock-data has no weights: its domains are written at start-up.)
        self._check_mixing()
        if self.data.mock_data and self.data.data_cache_path:
            raise ConfigError(
                f"--data-cache-path {self.data.data_cache_path} with --mock-data: the mock shards are "
                "written to a new temporary directory every run, so their cached indices would never "
                "be read again; drop --data-cache-path"
            )
        self._check_schedule_units()
        self.parallel.resolve_virtual_pipeline(self.model.num_layers)
        self._check_model_flags()
        sched = self.schedule
        if not self.checkpoint.save:
            _refuse_without(
                {
                    k: v
                    for k, v in (
                        ("exit_interval", sched.exit_interval),
                        ("exit_signal_handler", sched.exit_signal_handler or None),
                        ("exit_duration_in_mins", sched.exit_duration_in_mins),
                    )
                    if v is not None
                },
                "--save",
                "the run would stop early with no checkpoint to resume from (to end it earlier, lower --train-iters)",
                "--save DIR",
            )
        self._check_scheduler_resume_flags()
        if self.optimizer.use_distributed_optimizer and self.checkpoint.ckpt_format == "torch" and self.checkpoint.save:
            raise ConfigError(
                "--use-distributed-optimizer with --ckpt-format torch would lose the sharded optimizer state; "
                "save with --ckpt-format torch_dist (the default)"
            )
        self.freeze()

    def freeze(self) -> None:
        """Read-only from here on, every section too (config_checks.ReadOnlyOnceParsed): what a job does is
        what its parsed config says; a changed config is a copy (dataclasses.replace)."""
        for section in (
            self.model,
            self.parallel,
            self.data,
            self.optimizer,
            self.schedule,
            self.checkpoint,
            self.logging,
            self.mixing,
        ):
            section.freeze()
        super().freeze()

    def _check_scheduler_resume_flags(self) -> None:
        """--override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler act only when a resume loads
        the checkpoint's LR schedule: an error with nothing to load, --finetune or --no-load-optim."""
        opt, ckpt = self.optimizer, self.checkpoint
        given = {
            k: True for k in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler") if getattr(opt, k)
        }
        if not given:
            return
        if not ckpt.load:
            _refuse_without(given, "--load", "there is no checkpoint schedule to override or keep", "--load DIR")
        if ckpt.finetune or not ckpt.load_optim:
            names = ", ".join(map(_flag, given))
            why = "--finetune" if ckpt.finetune else "--no-load-optim"
            raise ConfigError(
                f"{names} with {why}, which starts a fresh LR schedule from this run's flags (the "
                "checkpoint's is not loaded): it has no effect; drop it"
            )

    def _check_mixing(self) -> None:
        """The mixing section's checks against the other sections (mixing/config.py)."""
        from megatron_dga.model import uses_transformer_engine

        model = self.model
        check_job(
            self.mixing,
            data_path_weights=parse_data_path(self.data.data_path)[2] if self.data.data_path else None,
            domain_map=self.data.domain_map,
            use_distributed_optimizer=self.optimizer.use_distributed_optimizer,
            precision="--bf16" if model.bf16 else "--fp16" if model.fp16 else None,
            transformer_engine=uses_transformer_engine(model),
        )

    def _check_schedule_units(self) -> None:
        """Megatron's rule: a run counts iterations or samples, and its LR flags count the same."""
        opt, sched = self.optimizer, self.schedule
        if sched.train_samples is None:
            _refuse_without(
                {
                    k: getattr(opt, k)
                    for k, unset in (("lr_warmup_samples", 0), ("lr_decay_samples", None))
                    if getattr(opt, k) != unset
                },
                "--train-samples",
                "with --train-iters the LR schedule counts iterations (--lr-warmup-iters, --lr-decay-iters)",
                "--train-samples N",
            )
            return
        by_iters = {
            k: getattr(opt, k)
            for k, unset in (("lr_warmup_iters", 0), ("lr_decay_iters", None))
            if getattr(opt, k) != unset
        }
        if by_iters:
            names = ", ".join(f"{_flag(k)} {v}" for k, v in by_iters.items())
            raise ConfigError(
                f"{names} with --train-samples {sched.train_samples}: a run by samples counts its LR "
                "schedule in samples (Megatron's rule); use --lr-warmup-samples/--lr-decay-samples or "
                "--lr-warmup-fraction"
            )

    def _check_model_flags(self) -> None:
        """Model flags this machine or this trainer cannot honour: an error at start-up, never a fallback."""
        from megatron_dga.model import transformer_engine_available

        model = self.model
        model.check_machine(transformer_engine_available())
        self.parallel.check_context_parallel(transformer_engine_available())
        if not model.fp16:
            _refuse_without(
                {k: getattr(self.optimizer, k) for k in LOSS_SCALE_FLAGS if getattr(self.optimizer, k) is not None},
                "--fp16",
                "only fp16 training scales its loss",
            )
