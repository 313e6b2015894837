"""Contracts with megatron-core (and torch) for every call only a GPU machine makes.

CI runs megatron-core's optimizer, scheduler, schedules, DDP and local layer spec with
our exact arguments (tests/test_megatron_path.py, test_trainer.py, test_pipeline.py). The
calls below run only where CUDA or transformer-engine is present; each is bound here
with ``inspect.signature(f).bind(...)`` against the installed megatron-core, using the
arguments our code passes, so an API change fails CI instead of a user's job. The
arguments come from the same helpers the production code calls wherever possible.
"""
import ast
import inspect
import pathlib
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


def test_cuda_seeding_binds():
    from megatron.core import tensor_parallel

    inspect.signature(tensor_parallel.model_parallel_cuda_manual_seed).bind(1234)


def test_nccl_process_group_init_binds():
    import torch.distributed as dist

    inspect.signature(dist.init_process_group).bind(
        backend="nccl", init_method=None, rank=0, world_size=8, timeout=timedelta(minutes=30),
        device_id=torch.device("cuda", 0))


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

    kwargs = dict(forward_step_func=None, data_iterator=None, model=[None], num_microbatches=1, seq_length=8,
                  micro_batch_size=1, forward_only=False, force_all_reduce=True)
    for fn in (schedules.forward_backward_no_pipelining, schedules.forward_backward_pipelining_without_interleaving,
               schedules.forward_backward_pipelining_with_interleaving):
        inspect.signature(fn).bind(**kwargs)
    # The schedule calls config.finalize_model_grads_func like this; ours must accept it too.
    from megatron_dga.training.step import _finalize_without_data_parallel

    for fn in (finalize_model_grads, _finalize_without_data_parallel):
        inspect.signature(fn).bind([None], None, pg_collection=None, force_all_reduce=False)
    inspect.signature(_allreduce_word_embedding_grads).bind([None], object())


def test_optimizer_and_scheduler_bind():
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_dga.training.config import OptimizerConfig
    from megatron_dga.training.optim import megatron_optimizer_config, scheduler_arguments

    cfg = OptimizerConfig(use_distributed_optimizer=True)
    inspect.signature(get_megatron_optimizer).bind(megatron_optimizer_config(cfg, bf16=True), [None])
    inspect.signature(OptimizerParamScheduler).bind(None, **scheduler_arguments(cfg, train_iters=100))


def test_distributed_optimizer_checkpoint_api_binds():
    """resume.py / optim.py call these for torch_dist checkpoints of the distributed optimizer."""
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_dga.training.resume import DIST_CKPT_METADATA

    inspect.signature(DistributedOptimizer.sharded_state_dict).bind(object(), {}, True, metadata=DIST_CKPT_METADATA)
    inspect.signature(DistributedOptimizer._init_optimizer_states_with_dummy_values).bind(object())
    source = inspect.getsource(DistributedOptimizer.sharded_state_dict)
    assert f"sharding_type == '{DIST_CKPT_METADATA['distrib_optim_sharding_type']}'" in source


def test_mixed_precision_optimizer_attributes_exist():
    """optim.adam_second_moments reads these megatron-core attributes (bf16 path)."""
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params

    source = inspect.getsource(Float16OptimizerWithFloat16Params.__init__)
    for attribute in ("self.float16_groups", "self.fp32_from_float16_groups", "self.fp32_from_fp32_groups"):
        assert attribute in source, attribute


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
                if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            elif isinstance(node, ast.Attribute) and node.attr == "distributed":
                if isinstance(node.value, ast.Name) and node.value.id == "torch":
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []
