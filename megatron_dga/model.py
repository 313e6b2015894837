"""megatron-core GPTModel from a small dataclass config.

No torch.distributed here: the parallel layout comes in through ``ParallelContext``
(megatron-core reads its own parallel_state, which ``platform.initialize`` set up).
With pipeline parallelism each rank builds its stage (``build_stage_model``); megatron's
schedules (``training/step.py``) connect the stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megatron_dga.errors import ConfigError


@dataclass
class GPTModelConfig:
    """Shape and numerics of the GPT model (Megatron flag names in parentheses)."""

    num_layers: int = 2
    """Transformer layers (--num-layers)."""
    hidden_size: int = 128
    """Model width (--hidden-size)."""
    num_attention_heads: int = 4
    """Attention heads (--num-attention-heads); must be divisible by the TP size."""
    ffn_hidden_size: Optional[int] = None
    """MLP width (--ffn-hidden-size); None means 4 x hidden_size."""
    seq_length: int = 128
    """Tokens per training sequence (--seq-length)."""
    max_position_embeddings: Optional[int] = None
    """Learned position table size (--max-position-embeddings); None means seq_length."""
    vocab_size: int = 0
    """Tokenizer vocabulary size; padded up for TP (see padded_vocab_size). Set from the tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this x TP size (--make-vocab-size-divisible-by)."""
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    """--position-embedding-type."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """--normalization."""
    untie_embeddings_and_output_weights: bool = False
    """--untie-embeddings-and-output-weights; tied by default, as in Megatron's GPT."""
    bf16: bool = False
    """Parameters and activations in bf16 (--bf16). fp32 otherwise."""
    hidden_dropout: float = 0.0
    """--hidden-dropout (0 by default: short runs, and deterministic probes)."""
    attention_dropout: float = 0.0
    """--attention-dropout."""
    init_method_std: float = 0.02
    """Std of the normal weight init (--init-method-std)."""

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ConfigError(
                f"--position-embedding-type must be learned_absolute or rope, got {self.position_embedding_type!r}"
            )
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
                f"--seq-length {self.seq_length}"
            )

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary padded so every TP rank holds an equal, aligned slice (as Megatron does)."""
        if self.vocab_size < 1:
            raise ConfigError("vocab_size is unset: it comes from the tokenizer (--tokenizer-model)")
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp_size: int, pp_size: int) -> None:
        """Errors for layouts megatron-core would reject deep inside model construction."""
        if self.num_attention_heads % tp_size:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp_size}; pick a TP size that divides the heads"
            )
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        if ffn % tp_size:
            raise ConfigError(f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp_size}")
        if self.num_layers % pp_size:
            raise ConfigError(
                f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size {pp_size}"
            )

    def num_parameters(self) -> int:
        """Parameter count of the unsplit model (embeddings counted once when tied)."""
        h, L = self.hidden_size, self.num_layers
        ffn = self.ffn_hidden_size or 4 * h
        vocab = self.padded_vocab_size(1)
        per_layer = 4 * h * h + 4 * h + 2 * h * ffn + ffn + h + 4 * h  # attention, mlp, two norms
        emb = vocab * h + (self.max_position_embeddings * h if self.position_embedding_type == "learned_absolute" else 0)
        head = 0 if not self.untie_embeddings_and_output_weights else vocab * h
        return emb + L * per_layer + 2 * h + head


def transformer_engine_available() -> bool:
    """True when transformer-engine imports and a GPU is present (its layers need CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def build_transformer_config(cfg: GPTModelConfig, tp_size: int, pp_size: int):
    """The megatron-core TransformerConfig for ``cfg`` on this layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_parallel(tp_size, pp_size)
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        pipeline_dtype=cfg.params_dtype,
        params_dtype=cfg.params_dtype,
        bf16=cfg.bf16,
        # CPU init draws the full master weight from the default generator and then splits
        # it, so a TP=2 model starts from the same weights as TP=1 (tests rely on this).
        use_cpu_initialization=on_cpu,
        # Fusions need apex/TE kernels; off keeps CPU and plain-GPU numerics identical.
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec_arguments(cfg: GPTModelConfig, use_transformer_engine: bool) -> dict:
    """Keyword arguments of megatron-core's layer-spec function for ``cfg``.

    The local spec builds its norm modules from ``normalization``; transformer-engine
    layers read the norm from the TransformerConfig and take no such argument
    (``get_gpt_layer_with_transformer_engine_spec(normalization=...)`` is a TypeError).
    ``tests/test_megatron_contract.py`` binds both against the installed megatron-core.
    """
    return {} if use_transformer_engine else {"normalization": cfg.normalization}


def layer_spec_for(cfg: GPTModelConfig, use_transformer_engine: bool):
    """The transformer-layer ModuleSpec: transformer-engine layers on GPU, local layers otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    fn = (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec if use_transformer_engine
          else gpt_layer_specs.get_gpt_layer_local_spec)
    return fn(**layer_spec_arguments(cfg, use_transformer_engine))


def build_gpt_model(cfg: GPTModelConfig, tp_size: int = 1, pp_size: int = 1, *, pre_process: bool = True,
                    post_process: bool = True):
    """Build this rank's part of the GPT (its TP slice and PP stage), on the current device.

    Args:
        cfg: model shape.
        tp_size, pp_size: the layout megatron's parallel_state was initialised with.
        pre_process: this stage holds the embedding (first pipeline stage).
        post_process: this stage holds the output layer and loss (last pipeline stage).
    """
    from megatron.core.models.gpt import GPTModel

    config = build_transformer_config(cfg, tp_size, pp_size)
    layer_spec = layer_spec_for(cfg, use_transformer_engine=transformer_engine_available())
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=cfg.padded_vocab_size(tp_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def causal_attention_mask(seq_length: int, device) -> torch.Tensor:
    """Megatron's boolean mask, True where attention is NOT allowed: shape (1, 1, s, s).

    Passed explicitly because megatron-core builds a default one on "cuda".
    """
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def unwrap(model):
    """The megatron GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_stage_model(cfg: GPTModelConfig, ctx):
    """This rank's pipeline stage of the GPT (its TP slice); bf16 models wrapped like Megatron's.

    Args:
        cfg: model shape.
        ctx: the ``platform.ParallelContext`` (tp/pp sizes, this rank's stage).

    Returns:
        (core, module): the megatron ``GPTModel`` (state dicts, parameters) and the module to
        wrap in DDP: the core itself in fp32, megatron's ``Float16Module`` around it with
        --bf16 (it casts the first stage's inputs to bf16 and the last stage's output back
        to fp32, as in Megatron's ``get_model``).
    """
    from megatron_dga import platform

    # GPTModelConfig.check_parallel (inside build_gpt_model) rejects layers not divisible by stages.
    # With several stages megatron's LanguageModule moves the tied embedding to CUDA to
    # all-reduce it between the first and last stage at construction.
    with platform.megatron_cuda_calls_on_cpu():
        core = build_gpt_model(cfg, ctx.tp_size, ctx.pp_size, pre_process=ctx.is_first_stage,
                               post_process=ctx.is_last_stage)
    if core.config.sequence_parallel and ctx.pp_size > 1:
        raise ConfigError("pipeline parallelism with sequence parallelism is not supported; turn sequence parallel off")
    if not cfg.bf16:
        return core, core
    from megatron.core.transformer.module import Float16Module

    return core, Float16Module(core.config, core)


def global_parameter_names(model) -> dict:
    """This stage's parameters under the names they have in the unsplit (one-stage) model.

    Megatron numbers a stage's layers from 0 in its module names; the global index comes
    from each layer's ``layer_number`` (1-based, offset by the stage). The last stage's
    tied copy of the word embedding (``output_layer.weight`` marked ``shared``) is left
    out: the first stage owns ``embedding.word_embeddings.weight``.
    """
    core = unwrap(model)
    layers = getattr(getattr(core, "decoder", None), "layers", [])
    offsets = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}." for i, layer in enumerate(layers)}
    named = {}
    for name, param in core.named_parameters():
        if getattr(param, "shared", False):
            continue
        parts = name.split(".")
        if name.startswith("decoder.layers.") and len(parts) > 2:
            prefix = ".".join(parts[:3]) + "."
            name = offsets[prefix] + name[len(prefix):]
        named[name] = param
    return named
