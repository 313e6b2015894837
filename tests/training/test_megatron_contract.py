"""Contracts with megatron-core (and torch) for every call only a GPU machine makes.

CI runs megatron-core's optimizer, scheduler, schedules, DDP and local layer spec with
our exact arguments (tests/training/test_megatron_path.py, test_trainer.py, test_pipeline.py). The
calls below run only where CUDA or transformer-engine is present; each is bound here
with ``inspect.signature(f).bind(...)`` against the installed megatron-core, using the
arguments our code passes, so an API change fails CI instead of a user's job. The
arguments come from the same helpers the production code calls wherever possible.
"""

import ast
import inspect
import pathlib
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

import megatron_dga

PACKAGE = pathlib.Path(megatron_dga.__file__).parent


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_transformer_engine_layer_spec_binds(normalization):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_dga.model import GPTModelConfig, layer_spec_arguments

    cfg = GPTModelConfig(normalization=normalization)
    inspect.signature(get_gpt_layer_with_transformer_engine_spec).bind(**layer_spec_arguments(cfg, True))
    inspect.signature(get_gpt_layer_local_spec).bind(**layer_spec_arguments(cfg, False))


def test_transformer_engine_layers_read_the_norm_from_the_config():
    """TE layers take the norm from TransformerConfig.normalization, which we set from --normalization."""
    from megatron_dga.model import GPTModelConfig, build_transformer_config

    cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, normalization="RMSNorm")
    assert build_transformer_config(cfg, 1, 1).normalization == "RMSNorm"


@pytest.mark.parametrize(
    "flags, backend",
    [
        ({"use_flash_attn": True}, "flash"),
        ({"attention_backend": "flash"}, "flash"),
        ({"attention_backend": "fused"}, "fused"),
        ({"attention_backend": "unfused"}, "unfused"),
    ],
)
def test_gpu_only_model_flags_bind(flags, backend):
    """--use-flash-attn / --attention-backend and --sequence-parallel reach megatron-core only where
    transformer-engine runs (GPTModelConfig.check_machine refuses them elsewhere): the
    TransformerConfig our mapping builds for them is constructed here against the installed one."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dga.model import GPTModelConfig, transformer_config_arguments

    cfg = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        group_query_attention=True,
        num_query_groups=2,
        swiglu=True,
        disable_bias_linear=True,
        normalization="RMSNorm",
        sequence_parallel=True,
        bf16=True,
        recompute_activations=True,
        **flags,
    )
    kwargs = transformer_config_arguments(cfg, 2, 1)
    inspect.signature(TransformerConfig).bind(**kwargs)
    config = TransformerConfig(**kwargs)
    assert config.attention_backend is AttnBackend[backend]
    assert config.sequence_parallel and config.recompute_granularity == "selective"
    # Megatron-LM turns sequence parallelism off without tensor parallelism.
    assert transformer_config_arguments(cfg, 1, 1)["sequence_parallel"] is False


def test_cuda_seeding_binds():
    from megatron.core import tensor_parallel

    inspect.signature(tensor_parallel.model_parallel_cuda_manual_seed).bind(1234)


def test_nccl_process_group_init_binds():
    import torch.distributed as dist

    inspect.signature(dist.init_process_group).bind(
        backend="nccl",
        init_method=None,
        rank=0,
        world_size=8,
        timeout=timedelta(minutes=30),
        device_id=torch.device("cuda", 0),
    )


def test_cuda_rng_tracker_state_api():
    """rng.py saves and restores the GPU tracker through get_states/set_states."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    inspect.signature(CudaRNGStatesTracker.get_states).bind(object())
    inspect.signature(CudaRNGStatesTracker.set_states).bind(object(), {})


def test_float16_module_and_ddp_bind():
    """bf16 wraps the model like Megatron's get_model (Float16Module) before DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    inspect.signature(Float16Module).bind(object(), object())
    inspect.signature(DistributedDataParallel).bind(object(), DistributedDataParallelConfig(), object())


def test_schedule_and_finalize_bind():
    """The keyword arguments step.forward_backward passes to every megatron schedule."""
    from megatron.core.distributed.finalize_model_grads import _allreduce_word_embedding_grads, finalize_model_grads
    from megatron.core.pipeline_parallel import schedules

    kwargs = dict(
        forward_step_func=None,
        data_iterator=None,
        model=[None],
        num_microbatches=1,
        seq_length=8,
        micro_batch_size=1,
        forward_only=False,
        force_all_reduce=True,
    )
    for fn in (
        schedules.forward_backward_no_pipelining,
        schedules.forward_backward_pipelining_without_interleaving,
        schedules.forward_backward_pipelining_with_interleaving,
    ):
        inspect.signature(fn).bind(**kwargs)
    # The schedule calls config.finalize_model_grads_func like this; ours must accept it too.
    from megatron_dga.training.step import _finalize_without_data_parallel

    for fn in (finalize_model_grads, _finalize_without_data_parallel):
        inspect.signature(fn).bind([None], None, pg_collection=None, force_all_reduce=False)
    inspect.signature(_allreduce_word_embedding_grads).bind([None], object())


def test_optimizer_and_scheduler_bind():
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_dga.training.config import OptimizerConfig, ScheduleConfig
    from megatron_dga.training.optim import megatron_optimizer_config, scheduler_arguments

    cfg = OptimizerConfig(use_distributed_optimizer=True)
    inspect.signature(get_megatron_optimizer).bind(megatron_optimizer_config(cfg, bf16=True), [None])
    inspect.signature(OptimizerParamScheduler).bind(None, **scheduler_arguments(cfg, ScheduleConfig(train_iters=100)))
    # --fp16 with the distributed optimizer (the CPU test runs megatron's fp16 optimizer without it).
    fp16 = megatron_optimizer_config(
        OptimizerConfig(use_distributed_optimizer=True, initial_loss_scale=2.0**16, hysteresis=4), bf16=False, fp16=True
    )
    assert (
        fp16.fp16,
        fp16.params_dtype,
        fp16.loss_scale,
        fp16.initial_loss_scale,
        fp16.min_loss_scale,
        fp16.loss_scale_window,
        fp16.hysteresis,
    ) == (True, torch.float16, None, 2.0**16, 1.0, 1000, 4)
    inspect.signature(get_megatron_optimizer).bind(fp16, [None])


def test_distributed_optimizer_checkpoint_api_binds():
    """resume.py / optim.py call these for torch_dist checkpoints of the distributed optimizer."""
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_dga.training.resume import dist_ckpt_metadata

    inspect.signature(DistributedOptimizer._init_optimizer_states_with_dummy_values).bind(object())
    inspect.signature(DistributedOptimizer._set_main_param_and_optimizer_states).bind(object(), None, {})
    source = inspect.getsource(DistributedOptimizer.sharded_state_dict)
    for sharding_type in ("dp_reshardable", "fully_reshardable"):
        metadata = dist_ckpt_metadata(sharding_type, mem_efficient=True)
        inspect.signature(DistributedOptimizer.sharded_state_dict).bind(object(), {}, True, metadata=metadata)
        assert f"sharding_type == '{sharding_type}'" in source
    reshardable = inspect.getsource(DistributedOptimizer.sharded_param_state_fully_reshardable)
    assert "'distrib_optim_fully_reshardable_mem_efficient'" in reshardable


def test_mixed_precision_optimizer_attributes_exist():
    """optim.adam_second_moments reads these megatron-core attributes (bf16 path)."""
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params

    source = inspect.getsource(Float16OptimizerWithFloat16Params.__init__)
    for attribute in ("self.float16_groups", "self.fp32_from_float16_groups", "self.fp32_from_fp32_groups"):
        assert attribute in source, attribute


# torch.distributed modules that hold no communication: the checkpoint format's metadata classes
# (training/checkpoint.py vets a checkpoint's pickled index against them before anything loads it).
NOT_COLLECTIVES = {"torch.distributed.checkpoint.metadata"}


def test_every_collective_goes_through_the_comm_module():
    """One communication layer: torch.distributed is called only in comm.py (and platform.py's init)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("comm.py", "platform.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(
                    (n == "torch.distributed" or n.startswith("torch.distributed.")) and n not in NOT_COLLECTIVES
                    for n in names
                ):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and node.attr == "distributed":
                if isinstance(node.value, ast.Name) and node.value.id == "torch":
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


# mixing/export.py reads a finished run's logs (metrics.jsonl, run_info.json) with training/metrics.py's reader,
# imported inside read_run(); the algorithm modules themselves never import training/.
TRAINING_READERS = {"mixing/export.py"}


def _imported_modules(path: pathlib.Path, node) -> list:
    """The absolute module names an import statement of ``path`` may load (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = ["megatron_dga", *path.parent.relative_to(PACKAGE).parts]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def test_mixing_and_data_never_import_training():
    """mixing/ and data/ stand on their own: the trainer imports them, never the other way round."""
    offenders = []
    for sub in ("mixing", "data"):
        for path in (PACKAGE / sub).rglob("*.py"):
            name = path.relative_to(PACKAGE).as_posix()
            if name in TRAINING_READERS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = _imported_modules(path, node)
                if any(n == "megatron_dga.training" or n.startswith("megatron_dga.training.") for n in names):
                    offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_importing_the_mixing_strategies_loads_neither_training_nor_megatron():
    """The algorithm (strategies, their config, the alignment estimators) imports without the trainer or megatron."""
    code = (
        "import sys; import megatron_dga.mixing.base, megatron_dga.mixing.config, megatron_dga.mixing.dga, "
        "megatron_dga.mixing.fixed; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] == 'megatron' or m.startswith('megatron_dga.training')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_virtual_pipeline_calls_bind():
    """Virtual pipeline stages (--num-layers-per-virtual-pipeline-stage): the megatron-core calls
    model.build_model_chunks, platform.initialize, the trainer and step.forward_backward make
    (tests/training/test_virtual_pipeline.py runs them over gloo; this binds them against any megatron-core)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dga.model import GPTModelConfig, transformer_config_arguments
    from megatron_dga.training.step import microbatch_group_size

    inspect.signature(parallel_state.initialize_model_parallel).bind(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
        distributed_timeout_minutes=30,
        create_gloo_process_groups=True,
    )
    inspect.signature(GPTModel).bind(
        config=None,
        transformer_layer_spec=None,
        vocab_size=64,
        max_sequence_length=8,
        pre_process=True,
        post_process=False,
        vp_stage=1,
    )
    inspect.signature(DistributedDataParallel).bind(
        object(), DistributedDataParallelConfig(), object(), disable_bucketing=True
    )
    # get_forward_backward_func picks the interleaved schedule from parallel_state's virtual size.
    interleaved = schedules.forward_backward_pipelining_with_interleaving
    assert schedules.get_forward_backward_func(pp_size=2, vp_size=2) is interleaved
    # Our TransformerConfig for 2 chunks per rank: Megatron's p2p settings for the interleaved schedule.
    kwargs = transformer_config_arguments(GPTModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4), 1, 2, 2)
    config = TransformerConfig(**kwargs)
    p2p = (config.virtual_pipeline_model_parallel_size, config.overlap_p2p_comm, config.batch_p2p_comm)
    assert p2p == (2, True, False)
    assert config.microbatch_group_size_per_vp_stage == 2  # megatron's default: PP, which training steps fill
    # The schedule's rules that step.microbatch_group_size and step._pad_for_interleaving satisfy.
    source = inspect.getsource(schedules.forward_backward_pipelining_with_interleaving)
    assert "config.microbatch_group_size_per_vp_stage > num_microbatches" in source
    assert "num_microbatches % config.microbatch_group_size_per_vp_stage" in source
    assert "data_iterator, list" in source  # one iterator per chunk
    for pp in (2, 3, 4):
        for m in range(pp, 13):
            group = microbatch_group_size(m, pp)
            assert pp <= group <= m and (m % group == 0 or m % group >= pp), (m, pp, group)
        assert microbatch_group_size(2 * pp, pp) == pp


def test_context_parallel_needs_transformer_engine_attention():
    """--context-parallel-size > 1 is refused without transformer-engine (GPTModelConfig/ParallelConfig)
    because megatron-core's local layer spec attends with DotProductAttention, which refuses CP > 1."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dga.model import GPTModelConfig, layer_spec_arguments

    spec = get_gpt_layer_local_spec(**layer_spec_arguments(GPTModelConfig(), False))
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, context_parallel_size=2)
    with pytest.raises(AssertionError, match="only supported by TEDotProductAttention"):
        DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_fine_domain_sample_and_shard_calls_bind():
    """fine_domains builds samples with megatron's mask/position function and reads shards with
    IndexedDataset.get; mock.write_packed_shard writes the index with megatron's _IndexWriter."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexWriter

    inspect.signature(_get_ltor_masks_and_position_ids).bind(
        torch.zeros(4, dtype=torch.long), 3, False, False, False, False
    )
    inspect.signature(IndexedDataset.get).bind(object(), 0, offset=0, length=4)
    inspect.signature(_IndexWriter).bind("x.idx", object())
    inspect.signature(_IndexWriter.write).bind(object(), [4], None, [0, 1])


FUSIONS = (
    "gradient_accumulation_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "apply_rope_fusion",
    "persist_layer_norm",
)


@pytest.mark.parametrize(
    "flag, field",
    [
        ("--no-bias-gelu-fusion", "bias_activation_fusion"),
        ("--no-bias-dropout-fusion", "bias_dropout_fusion"),
        ("--no-masked-softmax-fusion", "masked_softmax_fusion"),
        ("--no-rope-fusion", "apply_rope_fusion"),
    ],
)
def test_fusion_flags_reach_megatron_where_the_layers_have_the_kernels(monkeypatch, flag, field):
    """Megatron's fusion flags, on by default: with transformer-engine layers they reach the TransformerConfig
    (bound against the installed one), each --no-... turns its own off; on local layers (CPU) all are off."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dga import model as model_mod
    from megatron_dga.training.arguments import parse_args

    base = [
        "--data-path",
        "d",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "127",
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "1",
        "--train-iters",
        "1",
        "--position-embedding-type",
        "rope",
        "--bf16",
    ]
    local = model_mod.transformer_config_arguments(parse_args(base).model, 1, 1)
    assert not any(local[name] for name in FUSIONS)  # this machine's local layers: the plain ops
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(model_mod.GPTModelConfig, "check_machine", lambda self, te: None)
    on = model_mod.transformer_config_arguments(parse_args(base).model, 1, 1)
    inspect.signature(TransformerConfig).bind(**on)
    assert all(on[name] for name in FUSIONS if name not in ("gradient_accumulation_fusion", "persist_layer_norm"))
    off = model_mod.transformer_config_arguments(parse_args(base + [flag]).model, 1, 1)
    assert not off[field] and all(off[n] == on[n] for n in FUSIONS if n != field)
    # Megatron-LM's fallback: no bias-GeLU fusion without linear biases (megatron-core refuses that pair).
    nobias = model_mod.transformer_config_arguments(parse_args(base + ["--disable-bias-linear"]).model, 1, 1)
    assert not nobias["bias_activation_fusion"]
    TransformerConfig(**{**nobias, "apply_rope_fusion": False})  # megatron-core accepts what we build
