"""Helpers for tests that compare a parallel layout with one process: parameters by global name.

A layout test builds the single-process reference first, keeps its initial parameters
(``named``) and loads them into every rank of the parallel run (``load_initial``), so both start
from the same model whatever the layout's own initialisation would have drawn.
"""

from __future__ import annotations

import os

import numpy as np

EMBEDDING = "embedding.word_embeddings.weight"


def trainer_from(argv):
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    cfg = parse_args(argv)
    return Trainer(cfg, platform.initialize(cfg.parallel))


def pipeline_argv(shards: dict, log_dir, extra, iters: int) -> list:
    """The pipeline layout tests' run: the 4-layer GPT on ``synthetic.three_domain_shards`` with a global batch of 8,
    a log line every step, ``extra`` flags last."""
    from tests.helpers.synthetic import PIPELINE_GPT_ARGS, data_flags, run_argv

    data = data_flags(shards, specific_eval=True)
    return run_argv(log_dir, extra, data=data, model=PIPELINE_GPT_ARGS, micro_batch=None, iters=iters)


def train_steps(trainer, steps: int) -> None:
    """The trainer's loop without logging, checkpoints or evaluation: a step, then the mixing hook."""
    for _ in range(steps):
        trainer.train_step()
        trainer.iteration += 1
        new = trainer.mixing.after_step(trainer.view)
        if new is not None:
            trainer.data.set_weights(new)


def named(trainer) -> dict:
    """This rank's parameters by global name, as float32 numpy copies (bf16 parameters included)."""
    from megatron_dga.model import global_parameter_names

    return {name: p.detach().float().cpu().numpy().copy() for name, p in global_parameter_names(trainer.chunks).items()}


def shared_copy(trainer):
    """The last stage's tied copy of the word embedding (None elsewhere or untied)."""
    core = trainer.chunks[-1]
    if not core.post_process or core.pre_process or not core.share_embeddings_and_output_weights:
        return None
    weight = core.shared_embedding_or_output_weight()
    assert getattr(weight, "shared", False)
    return weight


def load_initial(trainer, init: dict) -> None:
    """Copy the reference's parameters (``named`` of a one-process run) into this rank's shards.

    Every model chunk of the rank (virtual pipeline stages) is loaded. Tensor-parallel weights take their tp_rank-th contiguous chunk along partition_dim; the last
    stage's tied embedding copy takes the embedding. With --bf16/--fp16 the optimizer's fp32 main
    copies are reloaded from the new parameters, as megatron does after loading a checkpoint.
    """
    import torch

    from megatron_dga.model import global_parameter_names

    def tp_slice(p, full):
        if not getattr(p, "tensor_model_parallel", False):
            return full
        return np.split(full, trainer.ctx.tp_size, axis=p.partition_dim)[trainer.ctx.tp_rank]

    with torch.no_grad():
        for name, p in global_parameter_names(trainer.chunks).items():
            p.copy_(torch.from_numpy(tp_slice(p, init[name])))
        shared = shared_copy(trainer)
        if shared is not None:
            shared.copy_(torch.from_numpy(tp_slice(shared, init[EMBEDDING])))
    if trainer.cfg.model.bf16 or trainer.cfg.model.fp16:
        trainer.optimizer.reload_model_params()


def logged_metrics(trainer, log_dir):
    """The run's metrics.jsonl records on the logging rank (None on the others)."""
    from megatron_dga.training.metrics import read_metrics

    if not trainer.ctx.is_logging_rank:
        return None
    return read_metrics(os.path.join(log_dir, "metrics.jsonl"))


def losses(metrics):
    """lm_loss of each logged iteration."""
    return np.array([m["lm_loss"] for m in metrics])


def gathered_stages(ranks, name, key="final"):
    """One dict of parameters by global name from every pipeline stage's ``rank[name][key]`` (each name once)."""
    merged = {}
    for rank in ranks:
        for pname, value in rank[name][key].items():
            assert pname not in merged, f"{pname} on two stages"
            merged[pname] = value
    return merged
