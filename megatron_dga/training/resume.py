"""What a training job's checkpoint holds, and the checks a resume makes before loading it.

torch_dist (the default, ``--ckpt-format``): one megatron-core sharded state dict,
written by every rank through ``dist_checkpointing`` and resharded on load, so a job
saved with (TP, PP, DP) resumes with (TP', PP', DP') (the distributed optimizer's state:
only DP' unless saved with --dist-ckpt-optim-fully-reshardable, see ``dist_ckpt_metadata``):

    model                 GPTModel.sharded_state_dict()           ShardedTensors (resharded);
                          (model0, model1, ... per virtual         keyed by global layer number, so
                          pipeline stage, as in Megatron)          the chunk split may change too
    optimizer             MegatronOptimizer.sharded_state_dict()   resharded; the distributed
                                                                   optimizer's 'dp_reshardable'
                                                                   (DP only) or
                                                                   'fully_reshardable'
    opt_param_scheduler   OptimizerParamScheduler.state_dict()     common
    rng_state             capture_rng_state() per (PP, TP) rank    ShardedObject; restored only
                                                                   on the same TP x PP layout
    megatron_dga          iteration, consumed samples/tokens,     common (rank 0 writes it)
                          sampler and mixing state

torch (legacy): ``checkpoint.save_checkpoint``'s per-model-parallel-rank files; TP and PP
must stay the same. Both formats carry the same JSON facts (``job_facts``) in the
checkpoint's metadata file, checked against this run *before* anything is loaded, so a
changed model shape, another domain list or another --mixing is one clear error, not a
traceback from inside a load. The facts also hold the LR/weight-decay schedule in effect: a
resume whose flags give another one is refused (Megatron's rule) unless
--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler says which wins
(:func:`check_schedule`).

Megatron's partial loads: --finetune loads the model only (iteration 0, everything else
fresh), --no-load-optim everything but the optimizer and scheduler, --no-load-rng everything
but the RNG states. With torch_dist the parts not loaded are left out of the sharded template
(``dist_checkpointing`` loads a subset of a checkpoint's keys), so they are never read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional

from megatron_dga.errors import ConfigError
from megatron_dga.training import checkpoint as ckpt
from megatron_dga.training.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


def dist_ckpt_metadata(sharding_type: str, mem_efficient: bool = False) -> Dict[str, object]:
    """megatron's ``sharded_state_dict`` metadata for the distributed optimizer's state.

    ``dp_reshardable`` (Megatron's default) saves each rank's buffers as they are: fast, the
    DP size may change on resume, TP and PP may not. ``fully_reshardable``
    (--dist-ckpt-optim-fully-reshardable) saves the state per model parameter, so any TP/PP/DP
    layout can resume it; the save gathers the state over the data-parallel ranks first
    (on every rank, or with --distrib-optim-fully-reshardable-mem-efficient on DP rank 0 over
    gloo). The other optimizers' checkpoints always reshard over TP, PP and DP.
    """
    return {
        "distrib_optim_sharding_type": sharding_type,
        "distrib_optim_fully_reshardable_mem_efficient": mem_efficient,
    }


def optimizer_sharding_type(cfg) -> str:
    """The distributed optimizer's checkpoint format this run saves (``--dist-ckpt-optim-fully-reshardable``)."""
    return "fully_reshardable" if cfg.checkpoint.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


MODEL_SHAPE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size",
    "max_position_embeddings": "--max-position-embeddings",
    "position_embedding_type": "--position-embedding-type",
    "normalization": "--normalization",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "group_query_attention": "--group-query-attention",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "swiglu": "--swiglu",
    "disable_bias_linear": "--disable-bias-linear",
    "add_qkv_bias": "--add-qkv-bias",
    "vocab_size": "--tokenizer-model / --vocab-size (the vocabulary)",
}
"""GPTModelConfig fields that decide parameter shapes, with the flag that sets each."""


def job_facts(trainer) -> Dict[str, object]:
    """JSON facts a resume checks: layout, model shape, domains, mixing."""
    model = trainer.cfg.model
    basis = getattr(getattr(trainer, "mixing", None), "basis", None)
    return {
        "mixing": trainer.cfg.mixing.strategy,
        "domains": list(trainer.data.domain_info.names),
        "model": {name: getattr(model, name) for name in MODEL_SHAPE_FLAGS},
        "seq_length": model.seq_length,
        "use_distributed_optimizer": trainer.cfg.optimizer.use_distributed_optimizer,
        "distrib_optim_sharding_type": optimizer_sharding_type(trainer.cfg),
        # The distributed optimizer's dp_reshardable state is laid out per chunk's grad buffer.
        "virtual_pipeline_stages": trainer.cfg.parallel.virtual_pipeline_model_parallel_size or 1,
        # --dga-basis: the mixing weights are over its N bases instead of the K domains.
        "dga_basis": None if basis is None else list(basis.basis_names),
    }


def basis_change_error(where: str, saved, mine) -> ConfigError:
    """--dga-basis added, removed or replaced since the checkpoint ``where`` (``saved``/``mine``: the basis
    names, None without a basis, True for a basis whose names the checkpoint does not record)."""

    def described(names) -> str:
        if names is None:
            return "without --dga-basis"
        return "with --dga-basis" + ("" if names is True else f" (bases {list(names)[:6]})")

    change = "adds --dga-basis" if saved is None else "drops --dga-basis" if mine is None else "has another --dga-basis"
    return ConfigError(
        f"--dga-basis: the checkpoint {where} was trained {described(saved)}, this run {change}"
        + ("" if mine is None or change == "adds --dga-basis" else f" (bases {list(mine)[:6]})")
        + "; the mixing weights are over the bases with a basis and over the domains without: resume with the "
        "checkpoint's --dga-basis, or pass --reset-mixing-state to keep the model and data position and start "
        "the mixing weights afresh"
    )


def schedule_facts(trainer) -> Dict[str, object]:
    """The LR/weight-decay schedule in effect, for :func:`check_schedule` (the scheduler's state but its step)."""
    return {k: v for k, v in trainer.optimizer.scheduler.state_dict().items() if k != "num_steps"}


def check_resumable(facts: Dict[str, object], trainer, where: str) -> None:
    """Raise ConfigError naming the flag and both values when this run cannot continue ``where``.

    The model shape is always checked. --finetune takes nothing else from the checkpoint, so
    its domains, --mixing and optimizer layout may differ; --no-load-optim lets the optimizer
    layout (--use-distributed-optimizer) differ.
    """
    mine = job_facts(trainer)
    saved_model = facts.get("model", {})
    for name, flag in MODEL_SHAPE_FLAGS.items():
        if name in saved_model and saved_model[name] != mine["model"][name]:
            raise ConfigError(
                f"{flag}: the checkpoint {where} was trained with {saved_model[name]!r}, this run has "
                f"{mine['model'][name]!r}; resume with the checkpoint's value (parameter shapes must match)"
            )
    if trainer.cfg.checkpoint.finetune:
        return
    saved_domains, domains = list(facts.get("domains", [])), mine["domains"]
    if saved_domains and saved_domains != domains:
        missing = [d for d in saved_domains if d not in domains]
        extra = [d for d in domains if d not in saved_domains]
        if missing or extra:
            raise ConfigError(
                f"--data-path: the checkpoint {where} has domains {saved_domains}; this run "
                + (f"lacks {missing}" if missing else "")
                + (" and " if missing and extra else "")
                + (f"adds {extra}" if extra else "")
                + "; resume with the same domains (a new domain list is a new run)"
            )
        raise ConfigError(  # align_domains_to_checkpoint runs first; this is an internal guard
            f"--data-path: the checkpoint {where} lists the same domains in another order ({saved_domains})"
        )
    saved_distopt = facts.get("use_distributed_optimizer")
    if (
        saved_distopt is not None
        and saved_distopt != mine["use_distributed_optimizer"]
        and trainer.cfg.checkpoint.load_optim
    ):
        raise ConfigError(
            f"--use-distributed-optimizer: the checkpoint {where} was saved "
            f"{'with' if saved_distopt else 'without'} it and this run is "
            f"{'with' if mine['use_distributed_optimizer'] else 'without'} it; the optimizer states "
            "are laid out differently, resume with the same setting (or pass --no-load-optim to start a fresh "
            "optimizer)"
        )
    if facts.get("mixing") not in (None, mine["mixing"]) and not trainer.cfg.checkpoint.reset_mixing_state:
        raise ConfigError(
            f"--mixing {mine['mixing']}: the checkpoint {where} was trained with --mixing {facts['mixing']}; "
            "resume with the same --mixing, or pass --reset-mixing-state to start the new strategy "
            "from its initial weights"
        )
    if (
        "dga_basis" in facts
        and facts["dga_basis"] != mine["dga_basis"]
        and not trainer.cfg.checkpoint.reset_mixing_state
    ):
        raise basis_change_error(where, facts["dga_basis"], mine["dga_basis"])


def check_schedule(saved: Dict[str, object], trainer, where: str) -> None:
    """Megatron's rule for a resume whose LR/weight-decay schedule differs from the checkpoint's.

    ``saved``: the checkpoint's scheduler values (its job facts, or its scheduler state when it
    predates them). A difference that acts (``optim.schedule_differences``) is a ConfigError naming
    each flag with both values, unless --override-opt_param-scheduler (this run's values, the
    iteration count continues) or --use-checkpoint-opt_param-scheduler (the checkpoint's values,
    written into the config so run_info.json records them) says which one wins.
    """
    from megatron_dga.training.optim import schedule_differences

    cfg = trainer.cfg
    diffs = schedule_differences(saved, cfg.optimizer, cfg.schedule)
    if not diffs:
        return
    listed = "; ".join(f"{flag}: the checkpoint has {_shown(a)}, this run {_shown(b)}" for flag, a, b in diffs)
    opt, loud = cfg.optimizer, trainer.ctx.is_logging_rank
    if opt.override_opt_param_scheduler:
        if loud:
            logger.warning(
                "--override-opt_param-scheduler: this run's LR schedule replaces the one of checkpoint %s (%s)",
                where,
                listed,
            )
        return
    if opt.use_checkpoint_opt_param_scheduler:
        if loud:
            logger.warning(
                "--use-checkpoint-opt_param-scheduler: the LR schedule of checkpoint %s is kept, this "
                "run's flags are not used (%s)",
                where,
                listed,
            )
        trainer.cfg = _with_checkpoint_schedule(saved, cfg)  # the config is read-only: a changed copy
        return
    raise ConfigError(
        f"the checkpoint {where} was trained with another LR schedule: {listed}; resume with the checkpoint's "
        "values, or pass --override-opt_param-scheduler to use this run's (its warmup and decay lengths are "
        "recomputed from this run's flags and the iteration count continues: how a run is extended), or "
        "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
    )


def _shown(value) -> str:
    """A schedule value as the message shows it: 0.003, 4, cosine."""
    return f"{value:g}" if isinstance(value, float) and float(value).is_integer() else str(value)


def _with_checkpoint_schedule(saved: Dict[str, object], cfg):
    """``cfg`` with the checkpoint's schedule where a flag holds it, so run_info.json records the values used."""
    values = dict(lr=saved["max_lr"], min_lr=saved["min_lr"], lr_decay_style=saved["lr_decay_style"])
    if saved.get("start_wd") == saved.get("end_wd"):
        values["weight_decay"] = saved["start_wd"]
    warmup, decay = float(saved["lr_warmup_steps"]), float(saved["lr_decay_steps"])
    if cfg.schedule.train_samples is None and warmup.is_integer() and decay.is_integer():
        values.update(lr_warmup_iters=int(warmup), lr_decay_iters=int(decay), lr_warmup_fraction=None)
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, **values))


def align_domains_to_checkpoint(cfg):
    """With --load, ``cfg`` with the --data-path domains in the checkpoint's order (matched by name).

    Called before the data pipeline is built: the sampler's streams, its state and the
    mixing weights are all indexed by domain position, so a reordered --data-path then
    continues the saved run exactly; per-domain --domain-token-limit values move with their
    domains. Another set of domains is left for :func:`check_resumable` to refuse.
    """
    if not cfg.checkpoint.load or cfg.checkpoint.finetune or not cfg.data.data_path:
        return cfg  # nothing loaded is indexed by domain (--finetune), or fixed names (--mock-data)
    from megatron_dga.data.domains import parse_data_path

    try:
        _, meta = ckpt.resolve_checkpoint(cfg.checkpoint.load, cfg.checkpoint.ckpt_step)
    except Exception:
        return cfg
    saved = list(meta.get("extra", {}).get("domains") or [])
    names, prefixes, weights = parse_data_path(cfg.data.data_path)
    if names == saved or sorted(names) != sorted(saved):
        return cfg
    order = [names.index(name) for name in saved]
    prefixes = [prefixes[i] for i in order]
    changed = {
        "data_path": prefixes
        if weights is None
        else [tok for i, p in zip(order, prefixes) for tok in (repr(weights[i]), p)]
    }
    limits = cfg.data.domain_token_limit
    if limits and len(limits) == len(names) > 1:
        changed["domain_token_limit"] = [limits[i] for i in order]
    logger.warning(
        "--data-path lists the checkpoint's domains in another order; using the checkpoint's order %s", saved
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changed))


# ----------------------------------------------------------------------------- save


def common_state(trainer) -> Dict[str, object]:
    return {
        "iteration": trainer.iteration,
        "consumed_samples": trainer.consumed_samples,
        "consumed_tokens": trainer.consumed_tokens,
        "data": trainer.data.state_dict(),
        "mixing": trainer.mixing.state_dict(),
    }


def sharded_state(
    trainer,
    *,
    is_loading: bool,
    with_rng: bool = True,
    with_optimizer: bool = True,
    sharding_type: Optional[str] = None,
) -> Dict[str, object]:
    """This rank's megatron sharded state dict of the whole job (see the module docstring).

    ``with_rng``/``with_optimizer`` False leave those parts out (a load then does not read
    them). ``sharding_type``: the distributed optimizer's format; this run's by default, the
    checkpoint's when loading.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    ctx = trainer.ctx
    metadata = dist_ckpt_metadata(
        sharding_type or optimizer_sharding_type(trainer.cfg),
        trainer.cfg.checkpoint.distrib_optim_fully_reshardable_mem_efficient,
    )
    state = model_state_dicts(trainer.chunks, lambda chunk: chunk.sharded_state_dict(metadata=metadata))
    if with_optimizer:
        # megatron's optimizer finds each parameter's ShardedTensor in the model entries (Megatron hands it
        # model0, model1, ... of the virtual stages together).
        models = state["model"] if len(trainer.chunks) == 1 else dict(state)
        state.update(trainer.optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata))
    state["megatron_dga"] = common_state(trainer)
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state",
            capture_rng_state(),
            (ctx.pp_size, ctx.tp_size),
            (ctx.pp_rank, ctx.tp_rank),
            replica_id=ctx.dp_rank,
        )
    return state


def model_keys(num_chunks: int) -> List[str]:
    """Megatron's model entries of a checkpoint: ``model`` for one chunk, ``model0``, ``model1``, ... for
    the chunks of virtual pipeline stages (megatron/training/checkpointing.py's keys)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_state_dicts(chunks, state_dict_of) -> Dict[str, object]:
    """``{key: state_dict_of(chunk)}`` under :func:`model_keys`."""
    return dict(zip(model_keys(len(chunks)), map(state_dict_of, chunks)))


def load_model_state_dicts(chunks, state: Dict[str, object], where: str) -> None:
    """Load the entries :func:`model_state_dicts` wrote into ``chunks``.

    Raises:
        ConfigError: a --ckpt-format torch checkpoint of another number of virtual pipeline stages
            (torch_dist templates are built from ``chunks``, so they always match).
    """
    keys = model_keys(len(chunks))
    if any(key not in state for key in keys):
        saved = [key for key in state if key == "model" or (key.startswith("model") and key[5:].isdigit())]
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage: the checkpoint {where} holds the model as {saved}, this run "
            f"builds {keys} (another number of virtual pipeline stages per rank); resume with the checkpoint's "
            "virtual pipeline flags, or save with --ckpt-format torch_dist, which reshards"
        )
    for key, chunk in zip(keys, chunks):
        chunk.load_state_dict(state[key])


def check_parameters_finite(trainer) -> None:
    """NumericalError unless every parameter on every rank is finite: no checkpoint holds NaN/Inf.

    One reduction per parameter, one host sync and one all-reduce of a flag, before anything
    is written, so --keep-last can never rotate the last finite checkpoint out for a broken one.
    A NaN or Inf anywhere makes a tensor's sum non-finite; a finite tensor whose sum overflows
    is told apart by an exact check of that tensor alone.
    """
    import torch

    from megatron_dga import comm
    from megatron_dga.errors import NumericalError

    params = trainer.params
    sums = torch.stack([p.detach().sum(dtype=torch.float32) for p in params])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    bad = sum(int(not bool(torch.isfinite(params[i].detach()).all())) for i in suspects)
    flag = comm.all_reduce(torch.tensor([float(bad)], device=trainer.ctx.device))
    if float(flag) > 0:
        raise NumericalError(
            f"iteration {trainer.iteration}: {int(float(flag))} parameter tensor(s) hold NaN/Inf; the checkpoint "
            "was not written (the previous ones are kept); lower --lr and resume from the last checkpoint"
        )


def save_job(trainer, *, background: bool = False):
    """Save the job in --ckpt-format; returns the checkpoint directory.

    ``background=True`` returns once the files are written: a ``checkpoint.PendingCheckpoint``
    whose ``finish()`` (on every rank) publishes them after their checksums.
    """
    check_parameters_finite(trainer)
    cfg = trainer.cfg.checkpoint
    layout = ckpt.CheckpointLayout.from_context(trainer.ctx)
    facts = {**job_facts(trainer), "opt_param_scheduler": schedule_facts(trainer)}
    if cfg.ckpt_format == "torch_dist":
        return ckpt.save_distributed_checkpoint(
            cfg.save,
            trainer.iteration,
            sharded_state(trainer, is_loading=False),
            layout=layout,
            keep_last=cfg.keep_last,
            metadata=facts,
            background=background,
        )
    state = (
        {
            **model_state_dicts(trainer.chunks, lambda chunk: chunk.state_dict()),
            "optimizer": trainer.optimizer.state_dict(),
            "rng": capture_rng_state(),
        }
        if layout.is_writer
        else {}
    )
    return ckpt.save_checkpoint(
        cfg.save,
        trainer.iteration,
        state,
        layout=layout,
        keep_last=cfg.keep_last,
        common_state=common_state(trainer),
        metadata=facts,
        background=background,
    )


# ----------------------------------------------------------------------------- load


def check_common_state(common, trainer, ckpt_dir, iteration: int) -> None:
    """CheckpointError, naming ``ckpt_dir`` and the fix, unless our saved numbers are usable.

    The checkpoint's parts each check their own entries: the trainer's counters here (integers >= 0,
    the iteration the metadata's), the data pipeline's sampler state (``DataPipeline.check_state``) and
    the mixing strategy's (``MixingStrategy.check_state``: its weights on the simplex, skipped with
    --reset-mixing-state, which replaces them). A damaged value would otherwise surface steps later as a
    sampler traceback or a NaN loss. Called before the trainer takes any of them.
    """
    from megatron_dga.state_checks import check_count, check_vector, state_error

    where, earlier = f"checkpoint {ckpt_dir}", "resume from an earlier checkpoint with --ckpt-step N"
    reset = trainer.cfg.checkpoint.reset_mixing_state
    mixing_fix = earlier if reset else f"{earlier}, or pass --reset-mixing-state to restart the mixing weights"

    if not isinstance(common, dict) or not isinstance(common.get("data"), dict):
        raise state_error(
            where,
            f"its megatron_dga state is {type(common).__name__} without a 'data' dict, not a training state",
            earlier,
        )
    for key in ("iteration", "consumed_samples", "consumed_tokens"):  # the trainer's own part
        check_count(common.get(key), key, where, earlier)
    if common["iteration"] != iteration:
        raise state_error(
            where, f"its state is for iteration {common['iteration']}, its metadata says {iteration}", earlier
        )
    data = common["data"]
    trainer.data.check_state(data, where, earlier, weights_fix=None if reset else mixing_fix)
    if reset:
        return
    basis = getattr(trainer.mixing, "basis", None)
    if data.get("basis_weights") is not None and basis is not None:  # a v1/v2 sampler state; it refuses another basis
        check_vector(
            data["basis_weights"], basis.matrix.shape[0], "sampler basis weights", where, mixing_fix, simplex=True
        )
    mixing = common.get("mixing")
    if isinstance(mixing, dict) and isinstance(mixing.get("weights"), list):
        saved_basis = data.get("basis_weights") is not None
        if len(mixing["weights"]) != trainer.mixing.num_weights and saved_basis != (
            basis is not None
        ):  # saved before the job facts recorded --dga-basis
            raise basis_change_error(
                str(ckpt_dir), True if saved_basis else None, None if basis is None else basis.basis_names
            )
    trainer.mixing.check_state(mixing, where, mixing_fix)


def load_job(trainer, load_dir: str) -> int:
    """Resume ``trainer`` from ``load_dir`` (either format); returns the checkpoint's iteration.

    With --finetune only the model weights are taken and the trainer stays at iteration 0;
    with --no-load-optim / --no-load-rng the optimizer and scheduler / the RNG states stay fresh.
    """
    cfg = trainer.cfg.checkpoint
    ckpt_dir, meta = ckpt.resolve_checkpoint(load_dir, cfg.ckpt_step)
    extra = meta.get("extra", {})
    if extra.get("contents") == ["model"] and not cfg.finetune:
        source = extra.get("converted_from", {}).get("path", "another format")
        raise ConfigError(
            f"--load {load_dir}: {ckpt_dir} holds model weights only (converted from {source}), no optimizer, "
            "data or mixing state to resume; add --finetune to start a run from these weights"
        )
    check_resumable(extra, trainer, str(ckpt_dir))
    load_optim, load_rng = cfg.load_optim and not cfg.finetune, cfg.load_rng and not cfg.finetune
    if load_optim and "opt_param_scheduler" in extra:
        check_schedule(extra["opt_param_scheduler"], trainer, str(ckpt_dir))
    ctx = trainer.ctx
    saved_padded = extra.get("padded_vocab_size")
    if saved_padded is not None and saved_padded != trainer.cfg.model.padded_vocab_size(ctx.tp_size):
        raise ConfigError(
            f"--tensor-model-parallel-size {ctx.tp_size} / --make-vocab-size-divisible-by "
            f"{trainer.cfg.model.make_vocab_size_divisible_by}: this run pads the vocabulary to "
            f"{trainer.cfg.model.padded_vocab_size(ctx.tp_size)} rows, the checkpoint {ckpt_dir} has {saved_padded}; "
            "convert it again for this TP size, or choose a TP size and --make-vocab-size-divisible-by that pad alike"
        )
    saved = meta["layout"]
    same_model_layout = (saved["tp_size"], saved["pp_size"]) == (ctx.tp_size, ctx.pp_size)
    # Checkpoints written before the flag existed hold Megatron's default format.
    sharding = meta.get("extra", {}).get("distrib_optim_sharding_type", "dp_reshardable")
    saved_vp = int(extra.get("virtual_pipeline_stages", 1))
    if (
        load_optim
        and trainer.cfg.optimizer.use_distributed_optimizer
        and sharding == "dp_reshardable"
        and not (same_model_layout and saved_vp == ctx.vp_size)
    ):
        virtual = f" with {saved_vp} virtual pipeline stages per rank" if saved_vp > 1 else ""
        raise ConfigError(
            f"--tensor-model-parallel-size/--pipeline-model-parallel-size/--num-layers-per-virtual-pipeline-stage: "
            f"the checkpoint {ckpt_dir} holds the distributed optimizer's state in Megatron's dp_reshardable format "
            f"for TP={saved['tp_size']} PP={saved['pp_size']}{virtual}, which reshards over data-parallel ranks "
            f"only; resume with TP={saved['tp_size']} PP={saved['pp_size']}{virtual} (any DP), or save with "
            "--dist-ckpt-optim-fully-reshardable to change TP/PP later"
        )
    if meta.get("ckpt_format", "torch") == "torch_dist":
        template = sharded_state(
            trainer,
            is_loading=True,
            with_rng=load_rng and same_model_layout,
            with_optimizer=load_optim,
            sharding_type=sharding,
        )
        state = ckpt.load_distributed_checkpoint(ckpt_dir, meta, template)
        optimizer_state = state
        common, rng = state.get("megatron_dga"), state.get("rng_state")  # a converted checkpoint has no common
    else:
        layout = ckpt.CheckpointLayout.from_context(ctx)
        _, state, common = ckpt.load_checkpoint(load_dir, layout=layout, iteration=meta["iteration"])
        optimizer_state, rng = state["optimizer"], state["rng"] if load_rng else None
    if load_optim and "opt_param_scheduler" not in extra:  # saved before the job facts held the schedule
        check_schedule(optimizer_state["opt_param_scheduler"], trainer, str(ckpt_dir))
    load_model_state_dicts(trainer.chunks, state, str(ckpt_dir))
    if load_optim:
        trainer.optimizer.load_state_dict(optimizer_state)
    else:
        trainer.optimizer.reload_model_params()
    if cfg.finetune:
        trainer.data.set_weights(trainer.mixing.initial_weights())
        return int(meta["iteration"])
    check_common_state(common, trainer, ckpt_dir, int(meta["iteration"]))
    trainer.iteration = int(common["iteration"])
    trainer.consumed_samples = int(common["consumed_samples"])
    trainer.consumed_tokens = int(common["consumed_tokens"])
    data_state = common["data"]
    if trainer.cfg.checkpoint.reset_mixing_state:  # the mixing restarts: its weights and basis may differ
        data_state = {**data_state, "basis_weights": None, "basis_fingerprint": None}
    trainer.data.load_state_dict(data_state)
    if trainer.cfg.checkpoint.reset_mixing_state:
        trainer.data.set_weights(trainer.mixing.initial_weights())
    else:
        trainer.mixing.load_state_dict(common["mixing"])  # checked by its check_state before anything loaded
        # The strategy owns the weights; the sampler receives them (its state holds none since v3).
        trainer.data.set_weights(trainer.mixing.current_weights())
    if rng is not None:
        restore_rng_state(rng)
    elif load_rng and ctx.is_logging_rank:
        logger.warning(
            "checkpoint %s was saved with TP=%d PP=%d, this run uses TP=%d PP=%d: its random streams do not "
            "map onto the new ranks and restart from --seed (no effect without dropout)",
            ckpt_dir,
            saved["tp_size"],
            saved["pp_size"],
            ctx.tp_size,
            ctx.pp_size,
        )
    return int(meta["iteration"])
