"""Process setup: torch.distributed, megatron-core parallel state, seeds, CPU shims.

This is the only module that initialises torch.distributed or patches anything.
Everything else receives a :class:`ParallelContext` (or process groups) explicitly.

Typical use (torchrun or a plain single process)::

    ctx = platform.initialize(ParallelConfig(tensor_model_parallel_size=2, seed=1234))
    ...
    platform.shutdown()

On a machine without CUDA the backend is gloo and a few megatron-core assumptions
about CUDA are shimmed (:func:`apply_cpu_shims` for the process, and the scoped
:func:`megatron_cuda_calls_on_cpu` around the megatron-core calls that hard-code CUDA);
with CUDA the backend is NCCL and nothing is patched.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_dga.config_checks import ReadOnlyOnceParsed
from megatron_dga.errors import ConfigError

_CPU_SHIMS_APPLIED = False


@dataclass
class ParallelConfig(ReadOnlyOnceParsed):
    """How the job is laid out over processes."""

    tensor_model_parallel_size: int = 1
    """Ranks each weight matrix is split over (--tensor-model-parallel-size)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages the layers are split over (--pipeline-model-parallel-size)."""
    backend: Optional[str] = None
    """torch.distributed backend; None picks nccl when CUDA is available, else gloo."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Transformer layers per virtual pipeline stage (--num-layers-per-virtual-pipeline-stage): each
    pipeline rank holds (layers / pipeline stages) / this many model chunks and megatron-core's
    interleaved 1F1B schedule runs them (a smaller pipeline bubble, more stage-to-stage traffic).
    Needs --pipeline-model-parallel-size >= 2; --num-layers must be divisible by pipeline size x
    this; the micro-batches per step (global batch / (micro batch x data-parallel size)) must be a
    multiple of the pipeline size. Not with --num-virtual-stages-per-pipeline-rank."""
    num_virtual_stages_per_pipeline_rank: Optional[int] = None
    """Model chunks per pipeline rank (--num-virtual-stages-per-pipeline-rank, Megatron's newer
    spelling of the same choice): --num-layers must be divisible by pipeline size x this. Not with
    --num-layers-per-virtual-pipeline-stage."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Derived, not a flag: model chunks per pipeline rank (megatron-core's name), None without
    virtual stages (also when the flags give one chunk per rank, as in Megatron). Set by
    :meth:`resolve_virtual_pipeline`."""
    context_parallel_size: int = 1
    """Ranks each sequence is split over (--context-parallel-size). Only 1 runs here: megatron-core's
    local attention supports no context parallelism (transformer-engine's attention does, on GPU), and
    this trainer does not split sequences or reduce losses over context-parallel ranks yet."""
    seed: int = 1234
    """Base random seed (--seed). Pipeline stages offset it the way Megatron does."""
    timeout_minutes: int = 30
    """Collective timeout; raise it for very slow first steps (compilation, huge checkpoints)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        for name in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.backend not in (None, "nccl", "gloo"):
            raise ConfigError(f"backend must be 'nccl', 'gloo' or None (auto), got {self.backend!r}")
        self._check_virtual_pipeline_flags()
        if self.num_virtual_stages_per_pipeline_rank is not None and self.virtual_pipeline_model_parallel_size is None:
            # Known without the model shape (resolve_virtual_pipeline checks --num-layers against it).
            vp = self.num_virtual_stages_per_pipeline_rank
            self.virtual_pipeline_model_parallel_size = vp if vp > 1 else None

    def _virtual_pipeline_flag(self) -> Optional[str]:
        """The virtual-pipeline flag given, with its value (None when neither is)."""
        for name in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"):
            if getattr(self, name) is not None:
                return f"--{name.replace('_', '-')} {getattr(self, name)}"
        return None

    def _check_virtual_pipeline_flags(self) -> None:
        """Megatron's rules for virtual stages that need no model shape (see resolve_virtual_pipeline)."""
        flag = self._virtual_pipeline_flag()
        if flag is None:
            return
        if (
            self.num_layers_per_virtual_pipeline_stage is not None
            and self.num_virtual_stages_per_pipeline_rank is not None
        ):
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {self.num_layers_per_virtual_pipeline_stage} and "
                f"--num-virtual-stages-per-pipeline-rank {self.num_virtual_stages_per_pipeline_rank} both set the "
                "virtual pipeline stages (Megatron takes one of them); keep one"
            )
        if self.pipeline_model_parallel_size < 2:
            raise ConfigError(
                f"{flag} interleaves the stages of a pipeline, and --pipeline-model-parallel-size is "
                f"{self.pipeline_model_parallel_size}; add --pipeline-model-parallel-size 2 (or more) or drop {flag}"
            )

    def resolve_virtual_pipeline(self, num_layers: int) -> None:
        """Set ``virtual_pipeline_model_parallel_size`` from the flags and --num-layers (Megatron's rules).

        Raises:
            ConfigError: --num-layers is not divisible by pipeline size x layers per virtual stage (or x
                virtual stages per rank).
        """
        flag = self._virtual_pipeline_flag()
        if flag is None:
            self.virtual_pipeline_model_parallel_size = None
            return
        pp = self.pipeline_model_parallel_size
        per_chunk = self.num_layers_per_virtual_pipeline_stage
        chunks = self.num_virtual_stages_per_pipeline_rank
        divisor = pp * (per_chunk or chunks)
        if num_layers % divisor:
            what = "layers per virtual stage" if per_chunk else "virtual stages per rank"
            raise ConfigError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} x {flag} = "
                f"{divisor} ({what}); use a --num-layers that is a multiple of {divisor}, or another {flag.split()[0]}"
            )
        vp = chunks if chunks else num_layers // pp // per_chunk
        # As Megatron: one chunk per rank is the plain (non-interleaved) schedule.
        self.virtual_pipeline_model_parallel_size = vp if vp > 1 else None

    def check_context_parallel(self, transformer_engine: bool) -> None:
        """ConfigError for --context-parallel-size > 1, naming why here (see the field's docstring).

        Args:
            transformer_engine: transformer-engine layers can run here (``model.transformer_engine_available()``).
        """
        cp = self.context_parallel_size
        if cp == 1:
            return
        trainer_gap = (
            "this trainer does not split sequences over context-parallel ranks yet (megatron-core's CP "
            "process groups, get_batch_on_this_cp_rank's sequence slicing and the loss all-reduce over "
            "CP ranks are not wired)"
        )
        if not transformer_engine:
            here = (
                "this machine has no CUDA GPU"
                if not torch.cuda.is_available()
                else "transformer-engine is not installed"
            )
            raise ConfigError(
                f"--context-parallel-size {cp} needs Transformer Engine's attention (megatron-core's local "
                f"DotProductAttention supports only 1), and {here}; besides, {trainer_gap}; use "
                "--context-parallel-size 1"
            )
        raise ConfigError(f"--context-parallel-size {cp}: {trainer_gap}; use --context-parallel-size 1")


@dataclass(frozen=True)
class ProcessGroups:
    """megatron-core's process groups of this rank, handed to ``megatron_dga.comm`` calls."""

    dp: Any
    """Data-parallel group (replicas of the same model shard)."""
    tp: Any
    """Tensor-model-parallel group."""
    pp: Any
    """Pipeline-model-parallel group (the stages of this rank's pipeline)."""
    mp: Any
    """Model-parallel group (tp x pp: together they hold one full model)."""
    embedding: Any
    """First and last pipeline stage (tied word-embedding copies); None without PP."""
    world: Any = None
    """All ranks (None is torch.distributed's default group)."""

    def by_name(self, name: str):
        """'world', 'dp', 'tp', 'pp' or 'mp' -> the group (mixing strategies name groups)."""
        if name not in ("world", "dp", "tp", "pp", "mp"):
            raise ValueError(f"group must be one of world, dp, tp, pp, mp; got {name!r}")
        return getattr(self, name)


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job. Built by :func:`initialize`."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    backend: str
    groups: Optional[ProcessGroups] = None
    """This rank's process groups (set by :func:`initialize`)."""
    vp_size: int = 1
    """Model chunks on this rank: virtual pipeline stages (megatron-core's interleaved schedule), else 1."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: the last rank holds the loss (last stage)."""
        return self.rank == self.world_size - 1

    def describe(self) -> str:
        vp = f", {self.vp_size} virtual stages per pp rank" if self.vp_size > 1 else ""
        return (
            f"world={self.world_size} (tp={self.tp_size} x pp={self.pp_size} x dp={self.dp_size}{vp}) "
            f"backend={self.backend} device={self.device}"
        )


def apply_cpu_shims() -> None:
    """Let megatron-core run on CPU. Only called when CUDA is absent.

    megatron-core allocates some buffers (attention workspace, DDP grad buffers, RoPE
    frequencies) on ``torch.cuda.current_device()`` and builds its tensor-parallel RNG
    tracker on CUDA generators. Pointing the former at "cpu" and using the no-op
    (inference) tracker is enough for forward, backward, DDP and TP over gloo; the
    numerics are unchanged (tests compare against plain PyTorch).
    """
    global _CPU_SHIMS_APPLIED
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shims() must not be called on a machine with CUDA")
    if _CPU_SHIMS_APPLIED:
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    _CPU_SHIMS_APPLIED = True


_CUDA_FACTORIES = ("tensor", "zeros", "empty", "ones", "full")
"""torch factory functions megatron-core calls with a literal ``device="cuda"``."""


def _cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = "cpu"
    return kwargs


@contextlib.contextmanager
def megatron_cuda_calls_on_cpu():
    """While megatron-core code runs without CUDA, give its hard-coded CUDA calls CPU meanings.

    megatron-core's optimizers, grad clipping, grad scaler and pipeline schedules allocate
    small bookkeeping tensors with a literal ``device="cuda"``, check
    ``param.type() == "torch.cuda.FloatTensor"``, move tensors with ``.cuda()`` and call
    ``torch.cuda.synchronize()``. Inside this block, on a machine without CUDA:

    * ``torch.tensor/zeros/empty/ones/full(..., device="cuda")`` allocate on the CPU;
    * ``Tensor.type()`` (no arguments) of a CPU tensor reports the ``torch.cuda.*`` name
      megatron-core checks for (same dtype, so its fp32/bf16/fp16 dispatch is unchanged);
    * ``Tensor.cuda()`` returns the tensor (it already lives where gloo wants it);
    * ``torch.cuda.synchronize/empty_cache`` do nothing (CPU work is synchronous);
    * megatron's save and restore of the CUDA generator around activation recomputation
      (``tensor_parallel.random._get/_set_cuda_rng_state``, --recompute-*) do nothing: there is
      no CUDA generator; megatron saves and restores the CPU generator (which draws CPU
      dropout masks) itself, so a recomputed forward repeats the original one.

    Everything is restored on exit, and on a machine with CUDA the block patches nothing:
    the GPU runs megatron-core untouched. The callers are the optimizer wrapper
    (``training/optim.py``), the schedule call (``training/step.py``) and pipelined model
    construction: those calls, and only those, are the code CI runs on CPU.
    """
    if torch.cuda.is_available():
        yield
        return
    saved_factories = {name: getattr(torch, name) for name in _CUDA_FACTORIES}
    saved_type, saved_cuda = torch.Tensor.type, torch.Tensor.cuda
    saved_sync, saved_empty_cache = torch.cuda.synchronize, torch.cuda.empty_cache
    from megatron.core.tensor_parallel import random as mcore_random

    saved_rng = mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state

    def on_cpu(factory):
        return lambda *args, **kwargs: factory(*args, **_cpu_device(kwargs))

    def cuda_type_name(self, *args, **kwargs):
        if args or kwargs or self.device.type != "cpu":
            return saved_type(self, *args, **kwargs)
        return saved_type(self).replace("torch.", "torch.cuda.", 1)

    for name, factory in saved_factories.items():
        setattr(torch, name, on_cpu(factory))
    torch.Tensor.type = cuda_type_name  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    try:
        yield
    finally:
        mcore_random._get_cuda_rng_state, mcore_random._set_cuda_rng_state = saved_rng
        for name, factory in saved_factories.items():
            setattr(torch, name, factory)
        torch.Tensor.type = saved_type  # type: ignore[assignment]
        torch.Tensor.cuda = saved_cuda  # type: ignore[assignment]
        torch.cuda.synchronize = saved_sync  # type: ignore[assignment]
        torch.cuda.empty_cache = saved_empty_cache  # type: ignore[assignment]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(config: ParallelConfig) -> ParallelContext:
    """Initialise torch.distributed and megatron-core's model-parallel groups.

    Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    without it, runs as a single process on a private loopback port.
    """
    from megatron.core import parallel_state

    use_cuda = torch.cuda.is_available()
    backend = config.backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend 'nccl' needs CUDA, and no GPU is visible; use gloo (the default on CPU)")

    from megatron_dga.model import transformer_engine_available

    config.check_context_parallel(transformer_engine_available())  # also for callers without PretrainConfig
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor-model-parallel size ({tp}) x "
            f"pipeline-model-parallel size ({pp}) = {tp * pp}; launch a multiple of {tp * pp} "
            f"processes or change --tensor-model-parallel-size/--pipeline-model-parallel-size"
        )

    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        apply_cpu_shims()

    if not dist.is_initialized():
        init_method = None  # torchrun's environment (env://)
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise ConfigError(f"WORLD_SIZE={world_size} but MASTER_ADDR is unset; launch with torchrun")
            # A single process on a private port, without touching os.environ: child processes
            # (tools, a second job) must not inherit a port this one holds.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            device_id=device if use_cuda else None,
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Megatron's get_forward_backward_func picks the interleaved schedule from this.
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=config.timeout_minutes,
        # megatron-core's optimizer factory asks for its gloo side groups on CPU and GPU alike
        # (the distributed optimizer's checkpointing uses them); on CPU they duplicate the main ones.
        create_gloo_process_groups=True,
    )
    ctx = ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=tp,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=pp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
        backend=backend,
        vp_size=config.virtual_pipeline_model_parallel_size or 1,
        groups=ProcessGroups(
            dp=parallel_state.get_data_parallel_group(),
            tp=parallel_state.get_tensor_model_parallel_group(),
            pp=parallel_state.get_pipeline_model_parallel_group(),
            mp=parallel_state.get_model_parallel_group(),
            embedding=parallel_state.get_embedding_group(check_initialized=False) if pp > 1 else None,
        ),
    )
    set_seed(config.seed, ctx)
    return ctx


def set_seed(seed: int, ctx: ParallelContext) -> None:
    """Seed python, numpy and torch like Megatron: one stream per pipeline stage.

    Tensor-parallel ranks share the default stream (so CPU-initialised master weights
    are identical before being split); on GPU megatron's RNG tracker adds a separate
    tensor-parallel stream for dropout inside split regions.
    """
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * ctx.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    else:
        # The training tracker needs CUDA generators; the inference tracker's fork() is a no-op.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def shutdown() -> None:
    """Tear down megatron's groups and the default process group (idempotent)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
