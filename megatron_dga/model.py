"""megatron-core GPTModel from a small dataclass config.

No torch.distributed here: the parallel layout comes in through ``ParallelContext``
(megatron-core reads its own parallel_state, which ``platform.initialize`` set up).
With pipeline parallelism each rank builds its stage, with virtual pipeline stages its
model chunks (``build_model_chunks``); megatron's schedules (``training/step.py``) connect them.

``GPTModelConfig`` holds Megatron-LM's model flags under their names and meanings (shape,
Llama-style attention/MLP/RoPE, recomputation, precision, attention backend);
``transformer_config_arguments`` and ``rope_arguments`` map them onto megatron-core's
``TransformerConfig`` and ``GPTModel`` in one place, for CPU and GPU alike. Flags whose
megatron-core code needs CUDA and transformer-engine are refused elsewhere
(``GPTModelConfig.check_machine``), never dropped.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch

from megatron_dga.config_checks import ReadOnlyOnceParsed
from megatron_dga.errors import ConfigError

logger = logging.getLogger(__name__)

_TE_ATTENTION_BACKENDS = ("flash", "fused", "unfused")
"""megatron-core attention backends that select a transformer-engine kernel (TE's NVTE_* switches)."""


@dataclass
class GPTModelConfig(ReadOnlyOnceParsed):
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
    """Pad the vocabulary to a multiple of this x TP size (--make-vocab-size-divisible-by). The padded
    entries are kept out of the loss (:func:`mask_padded_vocab`), so the model computes the same
    function at every TP size and a checkpoint resumes on another one unchanged."""
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    """learned_absolute (GPT-2) or rope (rotary, with --rotary-base and --rotary-percent)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    """LayerNorm or RMSNorm (Llama-style models), with --norm-epsilon."""
    untie_embeddings_and_output_weights: bool = False
    """--untie-embeddings-and-output-weights; tied by default, as in Megatron's GPT."""
    norm_epsilon: float = 1e-5
    """Epsilon of the LayerNorm/RMSNorm layers (--norm-epsilon; Qwen and Mistral use 1e-6)."""
    group_query_attention: bool = False
    """Grouped-query attention (--group-query-attention): the query heads share --num-query-groups
    key/value heads, as in Llama 2 70B / Llama 3 / Qwen / Mistral."""
    num_query_groups: Optional[int] = None
    """Key/value head groups with --group-query-attention (--num-query-groups; Megatron's default 1,
    i.e. multi-query attention); must divide --num-attention-heads. Without
    --group-query-attention every head has its own keys and values (an error if given alone)."""
    kv_channels: Optional[int] = None
    """Width of one attention head (--kv-channels); None means hidden_size / num_attention_heads."""
    swiglu: bool = False
    """SwiGLU MLP (--swiglu): megatron-core's gated linear unit with SiLU. Without --ffn-hidden-size
    the MLP width is Megatron's int(8 x hidden_size / 3 / 64) x 64 (same parameter count as 4h GELU)."""
    openai_gelu: bool = False
    """GELU by its tanh approximation (--openai-gelu, Megatron-LM's flag), as GPT-2 was trained; the exact
    erf GELU otherwise. Not with --swiglu."""
    disable_bias_linear: bool = False
    """No biases in the attention and MLP linear layers (--disable-bias-linear; megatron-core's
    add_bias_linear=False), as in Llama, Qwen and Mistral."""
    add_qkv_bias: bool = False
    """Biases in the query/key/value projection only (--add-qkv-bias; Qwen2-style, with
    --disable-bias-linear). Always on without --disable-bias-linear, as in Megatron."""
    rotary_base: Optional[int] = None
    """RoPE base theta (--rotary-base, default 10000; Llama 3 uses 500000). With
    --position-embedding-type rope only (an error otherwise)."""
    rotary_percent: Optional[float] = None
    """Fraction of each head's dimensions RoPE rotates, in (0, 1] (--rotary-percent, default 1.0).
    With --position-embedding-type rope only."""
    use_rope_scaling: bool = False
    """Llama 3.1-style RoPE frequency scaling (--use-rope-scaling; megatron-core's rope_scaling).
    With --position-embedding-type rope only."""
    rope_scaling_factor: Optional[float] = None
    """Factor of --use-rope-scaling (--rope-scaling-factor, default 8.0); with it only."""
    bf16: bool = False
    """Parameters and activations in bf16 (--bf16), fp32 master weights in the optimizer. fp32 otherwise."""
    fp16: bool = False
    """Parameters and activations in fp16 with loss scaling (--fp16; megatron-core's Float16Module
    and its fp16 optimizer with fp32 master weights; --loss-scale and its sibling flags set the
    scaling; default dynamic). A step whose gradients overflow is skipped, as in Megatron; DGA's
    probes see the gradients unscaled. Not with --dga-estimator fd."""
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] = "auto"
    """megatron-core's attention implementation (--attention-backend): auto lets transformer-engine
    pick; flash, fused and unfused force a transformer-engine kernel (CUDA and transformer-engine
    only, an error elsewhere); local is megatron-core's own PyTorch attention (the local layer
    spec; what runs on CPU)."""
    use_flash_attn: bool = False
    """FlashAttention (--use-flash-attn): --attention-backend flash (transformer-engine's flash
    kernel; CUDA and transformer-engine only, an error elsewhere)."""
    recompute_activations: bool = False
    """Recompute the core attention in the backward pass instead of storing it
    (--recompute-activations): Megatron's shorthand for --recompute-granularity selective."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation (--recompute-granularity): full recomputes whole transformer layers
    (with --recompute-method and --recompute-num-layers), selective only the core attention. Same
    losses and gradients, less activation memory, one more forward per recomputed part."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """With --recompute-granularity full (--recompute-method): uniform splits each stage's layers into
    chunks of --recompute-num-layers and stores only each chunk's input; block recomputes the first
    --recompute-num-layers layers of each stage and stores the rest."""
    recompute_num_layers: Optional[int] = None
    """Layers per recomputed chunk (uniform) or recomputed layers per stage (block)
    (--recompute-num-layers), 1 to layers per pipeline stage (per virtual stage with
    --num-layers-per-virtual-pipeline-stage); with --recompute-granularity full only."""
    sequence_parallel: bool = False
    """Split norms, dropout and residuals along the sequence over the tensor-parallel ranks
    (--sequence-parallel): activations outside the tensor-parallel regions shrink by TP. With
    transformer-engine layers on GPU, and with megatron-core's local layers (on CPU too: their norms
    are ``model.SequenceParallelNorm``). Ignored with a warning at tensor-parallel size 1, as in Megatron."""
    gradient_accumulation_fusion: bool = True
    """Fuse the weight-gradient GEMM with its accumulation into main_grad (--no-gradient-accumulation-fusion
    turns it off; Megatron's default on). Needs apex's fused_weight_gradient_mlp_cuda on a CUDA GPU (the
    output layer is megatron-core's own linear); off elsewhere, as Megatron-LM falls back. DGA reads the
    gradients from main_grad either way."""
    bias_gelu_fusion: bool = True
    """Fuse bias and GeLU in the MLP (--no-bias-gelu-fusion); transformer-engine layers only, and only with
    linear biases (Megatron-LM turns it off with --disable-bias-linear)."""
    bias_swiglu_fusion: bool = True
    """Fuse bias and SwiGLU in the MLP with --swiglu (--no-bias-swiglu-fusion); transformer-engine layers only."""
    bias_dropout_fusion: bool = True
    """Fuse bias, dropout and the residual add (--no-bias-dropout-fusion); transformer-engine layers only."""
    masked_softmax_fusion: bool = True
    """Fuse scaling, masking and softmax in attention (--no-masked-softmax-fusion); transformer-engine
    layers only (local attention on CPU has no kernel for it)."""
    rope_fusion: bool = True
    """Fused rotary position embeddings (--no-rope-fusion); transformer-engine layers with
    --position-embedding-type rope only."""
    persist_layer_norm: bool = True
    """apex's persistent layer-norm kernel (--no-persist-layer-norm); used only by apex's fused norm, which
    these layer specs do not build (transformer-engine norms on GPU, torch norms on CPU): kept for
    Megatron's command line, effective where apex's kernel is importable with transformer-engine layers."""
    hidden_dropout: float = 0.0
    """--hidden-dropout (0 by default: short runs, and deterministic probes)."""
    attention_dropout: float = 0.0
    """Dropout probability on the attention probabilities (0 disables it)."""
    init_method_std: float = 0.02
    """Std of the normal weight init (--init-method-std)."""

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("num_query_groups", "kv_channels", "ffn_hidden_size", "recompute_num_layers", "rotary_base"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}; change one, or set the head width with --kv-channels"
            )
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ConfigError(
                f"--position-embedding-type must be learned_absolute or rope, got {self.position_embedding_type!r}"
            )
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if not self.norm_epsilon > 0:
            raise ConfigError(f"--norm-epsilon must be > 0, got {self.norm_epsilon}")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.max_position_embeddings < self.seq_length:
            raise ConfigError(
                f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
                f"--seq-length {self.seq_length}"
            )
        self._check_attention()
        self._check_rope()
        self._check_recompute()
        if self.openai_gelu and self.swiglu:
            raise ConfigError("--openai-gelu selects GELU's tanh approximation, but --swiglu uses SiLU; drop one")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 both given; pick one (bf16 needs no loss scaling)")
        _ = self.ffn_size  # the property raises for an invalid SwiGLU default width

    def _check_attention(self) -> None:
        if self.num_query_groups is not None and not self.group_query_attention:
            raise ConfigError(
                f"--num-query-groups {self.num_query_groups} given without --group-query-attention: every head "
                "would keep its own keys and values (Megatron ignores it); add --group-query-attention or drop it"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"--num-query-groups {self.query_groups} does not divide --num-attention-heads "
                f"{self.num_attention_heads}; each key/value group serves a whole number of query heads"
            )
        if self.attention_backend not in ("auto",) + _TE_ATTENTION_BACKENDS + ("local",):
            raise ConfigError(
                f"--attention-backend must be auto, flash, fused, unfused or local, got {self.attention_backend!r}"
            )
        if self.use_flash_attn and self.attention_backend not in ("auto", "flash"):
            raise ConfigError(
                f"--use-flash-attn selects --attention-backend flash, but --attention-backend "
                f"{self.attention_backend} was given too; drop one"
            )
        if self.effective_attention_backend in ("flash", "fused") and not (self.bf16 or self.fp16):
            flag = "--use-flash-attn" if self.use_flash_attn else f"--attention-backend {self.attention_backend}"
            raise ConfigError(
                f"{flag} needs --bf16 or --fp16: transformer-engine's flash and fused attention kernels take 16-bit "
                "inputs only (in fp32 the first forward fails with 'No dot product attention backend is available'); "
                f"add --bf16, or use --attention-backend unfused or auto in fp32"
            )

    def _check_rope(self) -> None:
        rope_flags = {
            "rotary_base": self.rotary_base,
            "rotary_percent": self.rotary_percent,
            "use_rope_scaling": self.use_rope_scaling or None,
            "rope_scaling_factor": self.rope_scaling_factor,
        }
        given = [_flag_text(k, v) for k, v in rope_flags.items() if v is not None]
        if given and self.position_embedding_type != "rope":
            one = len(given) == 1
            raise ConfigError(
                f"{', '.join(given)} {'acts' if one else 'act'} with --position-embedding-type rope only (here "
                f"{self.position_embedding_type}: {'it' if one else 'they'} would be ignored); add "
                f"--position-embedding-type rope or drop {'it' if one else 'them'}"
            )
        if self.rotary_percent is not None and not 0 < self.rotary_percent <= 1:
            raise ConfigError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.rope_scaling_factor is not None:
            if not self.use_rope_scaling:
                raise ConfigError(
                    f"--rope-scaling-factor {self.rope_scaling_factor} acts with --use-rope-scaling "
                    "only; add --use-rope-scaling or drop it"
                )
            if not self.rope_scaling_factor > 0:
                raise ConfigError(f"--rope-scaling-factor must be > 0, got {self.rope_scaling_factor}")

    def _check_recompute(self) -> None:
        granularity = self.recompute_granularity
        if granularity not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity must be full or selective, got {granularity!r}")
        if self.recompute_method not in (None, "uniform", "block"):
            raise ConfigError(f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if self.recompute_activations and granularity == "full":
            raise ConfigError(
                "--recompute-activations means --recompute-granularity selective, which contradicts "
                "--recompute-granularity full; drop one"
            )
        chunking = {
            k: v
            for k, v in (
                ("recompute_method", self.recompute_method),
                ("recompute_num_layers", self.recompute_num_layers),
            )
            if v is not None
        }
        if self.effective_recompute_granularity == "full":
            if len(chunking) < 2:
                raise ConfigError(
                    "--recompute-granularity full needs --recompute-method (uniform or block) and "
                    "--recompute-num-layers N; e.g. --recompute-method uniform --recompute-num-layers 1 "
                    "recomputes every layer"
                )
        elif chunking:
            names = ", ".join(_flag_text(k, v) for k, v in chunking.items())
            one = len(chunking) == 1
            now = (
                f"--recompute-granularity {self.effective_recompute_granularity} recomputes the core attention "
                "of every layer"
                if self.effective_recompute_granularity
                else "nothing is recomputed"
            )
            raise ConfigError(
                f"{names} {'acts' if one else 'act'} with --recompute-granularity full only ({now}); "
                f"add --recompute-granularity full or drop {'it' if one else 'them'}"
            )

    @property
    def effective_recompute_granularity(self) -> Optional[str]:
        """full, selective (also from --recompute-activations) or None."""
        return self.recompute_granularity or ("selective" if self.recompute_activations else None)

    @property
    def effective_attention_backend(self) -> str:
        """--attention-backend, or flash with --use-flash-attn."""
        return "flash" if self.use_flash_attn else self.attention_backend

    @property
    def query_groups(self) -> int:
        """Key/value head groups: --num-query-groups (default 1) with --group-query-attention, else one per head."""
        if not self.group_query_attention:
            return self.num_attention_heads
        return 1 if self.num_query_groups is None else self.num_query_groups

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """MLP width: --ffn-hidden-size, else 4h, or Megatron's int(8h/3 / 64) x 64 with --swiglu."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if not self.swiglu:
            return 4 * self.hidden_size
        # Megatron's SwiGLU default: two input projections of 2/3 the width keep 4h's parameter count.
        width = int((4 * self.hidden_size * 2 / 3) / 64) * 64
        if width < 1:
            raise ConfigError(
                f"--swiglu without --ffn-hidden-size gives Megatron's MLP width int(8 x {self.hidden_size} / 3 / 64)"
                f" x 64 = 0 for --hidden-size {self.hidden_size}; set --ffn-hidden-size"
            )
        return width

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary padded so every TP rank holds an equal, aligned slice (as Megatron does)."""
        if self.vocab_size < 1:
            raise ConfigError("vocab_size is unset: it comes from the tokenizer (--tokenizer-model)")
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp_size: int, pp_size: int, vp_size: Optional[int] = None) -> None:
        """Errors for layouts megatron-core would reject deep inside model construction.

        ``vp_size``: model chunks per pipeline rank (virtual stages; None or 1 without them).
        """
        if self.num_attention_heads % tp_size:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp_size}; pick a TP size that divides the heads"
            )
        groups = self.query_groups
        if groups % tp_size and tp_size % groups:
            raise ConfigError(
                f"--num-query-groups {groups} must be a multiple or a divisor of --tensor-model-parallel-size "
                f"{tp_size} (megatron-core splits or replicates whole key/value groups)"
            )
        ffn = self.ffn_size
        if ffn % tp_size:
            raise ConfigError(f"--ffn-hidden-size {ffn} is not divisible by --tensor-model-parallel-size {tp_size}")
        if self.num_layers % pp_size:
            raise ConfigError(
                f"--num-layers {self.num_layers} is not divisible by --pipeline-model-parallel-size {pp_size}"
            )
        chunks = vp_size or 1
        if self.num_layers % (pp_size * chunks):  # platform.ParallelConfig names the flag that set vp_size
            raise ConfigError(
                f"--num-layers {self.num_layers} is not divisible by {pp_size} pipeline stages x "
                f"{chunks} virtual stages per rank; change --num-layers or the virtual pipeline flag"
            )
        # megatron-core recomputes within each model chunk (a pipeline stage, or a virtual stage).
        per_chunk = self.num_layers // (pp_size * chunks)
        if self.recompute_num_layers is not None and self.recompute_num_layers > per_chunk:
            where = (
                f"pipeline stage (--num-layers {self.num_layers} / --pipeline-model-parallel-size {pp_size})"
                if chunks == 1
                else f"virtual pipeline stage ({chunks} per pipeline rank)"
            )
            raise ConfigError(
                f"--recompute-num-layers {self.recompute_num_layers} exceeds the {per_chunk} layers of each {where}"
            )

    def check_machine(self, transformer_engine: bool) -> None:
        """Errors for flags whose megatron-core code needs CUDA and transformer-engine, where they are absent.

        Called at start-up (``PretrainConfig``) and before the model is built; never a silent fallback.

        Args:
            transformer_engine: transformer-engine layers can run here (``transformer_engine_available()``).
        """
        if transformer_engine:
            return
        here = (
            "this machine has no CUDA GPU" if not torch.cuda.is_available() else "transformer-engine is not installed"
        )
        backend = self.effective_attention_backend
        if backend in _TE_ATTENTION_BACKENDS:
            flag = "--use-flash-attn" if self.use_flash_attn else f"--attention-backend {backend}"
            raise ConfigError(
                f"{flag} selects a transformer-engine attention kernel, which needs a CUDA GPU with "
                f"transformer-engine; {here}, where megatron-core's local attention runs; drop {flag}"
            )

    def num_parameters(self) -> int:
        """Parameter count of the unsplit model (embeddings counted once when tied)."""
        h, L, ffn = self.hidden_size, self.num_layers, self.ffn_size
        q = self.num_attention_heads * self.head_dim
        kv = 2 * self.query_groups * self.head_dim
        bias = not self.disable_bias_linear
        qkv_bias = bias or self.add_qkv_bias
        fc1 = 2 * ffn if self.swiglu else ffn
        norm = 2 * h if self.normalization == "LayerNorm" else h  # RMSNorm has no bias
        attention = h * (q + kv) + (q + kv) * qkv_bias + q * h + h * bias
        mlp = h * fc1 + fc1 * bias + ffn * h + h * bias
        per_layer = attention + mlp + 2 * norm
        vocab = self.padded_vocab_size(1)
        emb = vocab * h + (
            self.max_position_embeddings * h if self.position_embedding_type == "learned_absolute" else 0
        )
        head = 0 if not self.untie_embeddings_and_output_weights else vocab * h
        return emb + L * per_layer + norm + head


def _flag_text(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


def transformer_engine_available() -> bool:
    """True when transformer-engine imports and a GPU is present (its layers need CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401 - probing whether it imports
    except Exception:
        return False
    return True


def uses_transformer_engine(cfg: GPTModelConfig) -> bool:
    """transformer-engine layers for ``cfg`` here: where TE runs, unless --attention-backend local asks for
    megatron-core's own attention (Megatron's --spec local)."""
    return transformer_engine_available() and cfg.effective_attention_backend != "local"


def transformer_config_arguments(
    cfg: GPTModelConfig, tp_size: int, pp_size: int, vp_size: Optional[int] = None
) -> dict:
    """Keyword arguments of megatron-core's TransformerConfig for ``cfg`` on this layout.

    One mapping for every machine: the GPU-only values (a transformer-engine attention backend,
    sequence parallelism) are bound against the installed TransformerConfig in
    ``tests/training/test_megatron_contract.py``; :meth:`GPTModelConfig.check_machine` refuses them where
    they cannot run.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.utils import openai_gelu

    cfg.check_parallel(tp_size, pp_size, vp_size)
    on_cpu = not torch.cuda.is_available()
    granularity = cfg.effective_recompute_granularity
    return dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        # None: one key/value head per query head (megatron-core's default), as without GQA in Megatron.
        num_query_groups=cfg.query_groups if cfg.group_query_attention else None,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        # Megatron-LM's --swiglu: gated linear unit with SiLU (its bias-SwiGLU fusion stays off, below).
        gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else openai_gelu if cfg.openai_gelu else F.gelu,
        add_bias_linear=not cfg.disable_bias_linear,
        # As Megatron-LM's arguments: biases everywhere imply the QKV bias.
        add_qkv_bias=cfg.add_qkv_bias or not cfg.disable_bias_linear,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        attention_backend=AttnBackend[cfg.effective_attention_backend],
        recompute_granularity=granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=vp_size,
        # Megatron-LM's defaults: the interleaved schedule overlaps its stage-to-stage sends and receives
        # (--overlap-p2p-communication, needed at PP=2: two batched exchanges between the same two ranks
        # could deadlock), the plain 1F1B schedule batches them.
        overlap_p2p_comm=vp_size is not None,
        batch_p2p_comm=vp_size is None,
        # Megatron-LM turns sequence parallelism off at TP=1 (it would only change numerics).
        sequence_parallel=cfg.sequence_parallel and tp_size > 1,
        pipeline_dtype=cfg.params_dtype,
        params_dtype=cfg.params_dtype,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        # CPU init draws the full master weight from the default generator and then splits
        # it, so a TP=2 model starts from the same weights as TP=1 (tests rely on this).
        use_cpu_initialization=on_cpu,
        **fusion_arguments(cfg, uses_transformer_engine(cfg)),
    )


FUSION_FLAGS = (
    "gradient_accumulation_fusion",
    "bias_gelu_fusion",
    "bias_swiglu_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "rope_fusion",
    "persist_layer_norm",
)
"""GPTModelConfig's fusion fields (Megatron's --no-... flags)."""


def fusion_arguments(cfg: GPTModelConfig, transformer_engine: bool) -> dict:
    """Megatron's kernel fusions for ``cfg``: its flags (on by default, as in Megatron-LM), each on only
    where the layers have its kernel, with Megatron-LM's fallbacks. Local layers (CPU) run none: CI's
    numerics are those of the plain PyTorch ops.

    Args:
        transformer_engine: the model is built from transformer-engine layers (:func:`uses_transformer_engine`).
    """
    import importlib.util

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing
            return False

    te = transformer_engine
    bias_activation = (
        cfg.bias_swiglu_fusion
        if cfg.swiglu
        else (cfg.bias_gelu_fusion and not cfg.disable_bias_linear and not cfg.openai_gelu)
    )
    wgrad = (
        cfg.gradient_accumulation_fusion and torch.cuda.is_available() and importable("fused_weight_gradient_mlp_cuda")
    )
    if cfg.gradient_accumulation_fusion and torch.cuda.is_available() and not wgrad:
        logger.info(
            "gradient accumulation fusion is off: apex's fused_weight_gradient_mlp_cuda is not installed "
            "(as Megatron-LM; --no-gradient-accumulation-fusion silences this)"
        )
    return dict(
        gradient_accumulation_fusion=wgrad,
        bias_activation_fusion=te and bias_activation,
        bias_dropout_fusion=te and cfg.bias_dropout_fusion,
        masked_softmax_fusion=te and cfg.masked_softmax_fusion,
        apply_rope_fusion=te and cfg.rope_fusion and cfg.position_embedding_type == "rope",
        persist_layer_norm=te and cfg.persist_layer_norm and importable("apex.contrib.layer_norm"),
    )


def build_transformer_config(cfg: GPTModelConfig, tp_size: int, pp_size: int, vp_size: Optional[int] = None):
    """The megatron-core TransformerConfig for ``cfg`` on this layout (refusing what this machine cannot run)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_machine(transformer_engine_available())
    if cfg.sequence_parallel and tp_size == 1:
        logger.warning(
            "--sequence-parallel has no effect with --tensor-model-parallel-size 1; "
            "running without it (as Megatron does)"
        )
    return TransformerConfig(**transformer_config_arguments(cfg, tp_size, pp_size, vp_size))


def layer_spec_arguments(cfg: GPTModelConfig, use_transformer_engine: bool) -> dict:
    """Keyword arguments of megatron-core's layer-spec function for ``cfg``.

    The local spec builds its norm modules from ``normalization``; transformer-engine
    layers read the norm from the TransformerConfig and take no such argument
    (``get_gpt_layer_with_transformer_engine_spec(normalization=...)`` is a TypeError).
    ``tests/training/test_megatron_contract.py`` binds both against the installed megatron-core.
    """
    return {} if use_transformer_engine else {"normalization": cfg.normalization}


def layer_spec_for(cfg: GPTModelConfig, use_transformer_engine: bool):
    """The transformer-layer ModuleSpec: transformer-engine layers on GPU, local layers otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    fn = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_transformer_engine
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    return fn(**layer_spec_arguments(cfg, use_transformer_engine))


class SequenceParallelNorm:
    """A torch LayerNorm/RMSNorm for megatron-core's local layers that works with --sequence-parallel.

    With sequence parallelism each tensor-parallel rank normalises its own slice of the sequence, so
    a norm's weight (and bias) gradient is a partial sum over that slice. Like transformer-engine's
    and apex's norms, this one marks its parameters ``sequence_parallel``: megatron-core's
    ``finalize_model_grads`` (and DGA's probe finaliser, ``training/step.py``) sum them over the
    tensor-parallel group. megatron-core's own torch norm (``WrappedTorchNorm``, what its local spec
    builds without apex) refuses sequence parallelism. Same module and parameter names as that one, so
    checkpoints do not change. Built by :func:`transformer_block_spec` only with sequence parallelism.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        del persist_layer_norm, zero_centered_gamma, normalization  # read from the config, as WrappedTorchNorm
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def transformer_block_spec(cfg: GPTModelConfig, config, use_transformer_engine: bool, vp_stage: Optional[int]):
    """What GPTModel builds its decoder from: the layer spec, or with --sequence-parallel on local layers
    the whole block (layers and final norm) with :class:`SequenceParallelNorm` norms."""
    layer_spec = layer_spec_for(cfg, use_transformer_engine=use_transformer_engine)
    if use_transformer_engine or not config.sequence_parallel:
        return layer_spec
    import dataclasses

    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = dataclasses.replace(
        layer_spec,
        submodules=dataclasses.replace(
            layer_spec.submodules, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm
        ),
    )
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=SequenceParallelNorm
    )


def build_gpt_model(
    cfg: GPTModelConfig,
    tp_size: int = 1,
    pp_size: int = 1,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    initialize: bool = True,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    config=None,
):
    """Build this rank's part of the GPT (its TP slice and PP stage), on the current device.

    Args:
        cfg: model shape.
        tp_size, pp_size: the layout megatron's parallel_state was initialised with.
        pre_process: this stage holds the embedding (first pipeline stage).
        post_process: this stage holds the output layer and loss (last pipeline stage).
        initialize: draw the random initial weights (megatron's perform_initialization); False
            leaves them uninitialised, for callers that overwrite every weight (checkpoint converters).
        use_transformer_engine: transformer-engine layers (None: where they run, see
            :func:`uses_transformer_engine`); False builds megatron-core's local layers anywhere
            (checkpoint converters map their parameter names; checkpoints are the same for both).
        vp_stage: this chunk's virtual pipeline stage (megatron-core builds its layers and numbers them
            globally from it), None without virtual stages.
        config: the TransformerConfig to build with (one object shared by a rank's chunks, as in
            Megatron: the schedule reads its hooks from the first chunk's); None builds it for ``cfg``.
    """
    import dataclasses

    if config is None:
        config = build_transformer_config(cfg, tp_size, pp_size)
    if not initialize:
        config = dataclasses.replace(config, perform_initialization=False)
    if use_transformer_engine is None:
        use_transformer_engine = uses_transformer_engine(cfg)
    model = _gpt_model_class()(
        config=config,
        transformer_layer_spec=transformer_block_spec(cfg, config, use_transformer_engine, vp_stage),
        vocab_size=cfg.padded_vocab_size(tp_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        vp_stage=vp_stage,
        **rope_arguments(cfg),
    )
    model.unpadded_vocab_size = cfg.vocab_size
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """``logits`` with its padded vocabulary entries set to the dtype's lowest value, in place.

    Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP; the padded
    rows' logits would enter the softmax (zero rows of a checkpoint resharded to a larger padding
    add exp(0) terms: ln(768/640) = 0.18 nats at 640 -> 768 entries), so the loss would depend on the
    TP size. Masked, they take no probability and get no gradient.

    Args:
        logits: [..., V/TP], this tensor-parallel rank's slice of the vocabulary.
        vocab_size: the tokenizer's vocabulary; entries from it on are padding.
        vocab_start: the global index of the slice's first entry.
    """
    first = max(vocab_size - vocab_start, 0)
    if first < logits.shape[-1]:
        logits[..., first:] = torch.finfo(logits.dtype).min
    return logits


@functools.lru_cache(maxsize=None)
def _gpt_model_class():
    """megatron-core's GPTModel whose language-model loss leaves the padded vocabulary out (built on first use:
    importing megatron-core is slow, and the config classes here are read by the command line)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.utils import get_pg_rank

    class GPTModelOverVocabulary(GPTModel):
        """GPTModel whose loss sees only the first ``unpadded_vocab_size`` entries (``build_gpt_model`` sets it).

        Only the loss: logits returned without labels keep every entry (the converters' comparisons
        read the model's own rows).
        """

        unpadded_vocab_size: int = 0

        def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            start = get_pg_rank(self.pg_collection.tp) * logits.shape[-1]  # [s, b, V/TP]: this rank's slice
            return super().compute_language_model_loss(
                labels, mask_padded_vocab(logits, self.unpadded_vocab_size, start)
            )

    return GPTModelOverVocabulary


def rope_arguments(cfg: GPTModelConfig) -> dict:
    """GPTModel's RoPE keyword arguments: Megatron-LM's defaults where a flag was not given."""
    return dict(
        rotary_base=10000 if cfg.rotary_base is None else cfg.rotary_base,
        rotary_percent=1.0 if cfg.rotary_percent is None else cfg.rotary_percent,
        rope_scaling=cfg.use_rope_scaling,
        rope_scaling_factor=8.0 if cfg.rope_scaling_factor is None else cfg.rope_scaling_factor,
    )


@functools.lru_cache(maxsize=8)
def causal_attention_mask(seq_length: int, device) -> torch.Tensor:
    """Megatron's boolean mask, True where attention is NOT allowed: shape (1, 1, s, s).

    Passed explicitly because megatron-core builds a default one on "cuda". Built once per length
    and device (read-only: attention only reads it), not once per micro-batch.
    """
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def unwrap(model):
    """The megatron GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def build_stage_model(cfg: GPTModelConfig, ctx):
    """This rank's pipeline stage of the GPT (its TP slice) as one model; see :func:`build_model_chunks`.

    Returns:
        (core, module) of the rank's only chunk.

    Raises:
        RuntimeError: with virtual pipeline stages (each rank holds several chunks).
    """
    chunks = build_model_chunks(cfg, ctx)
    if len(chunks) != 1:
        raise RuntimeError(
            f"this rank holds {len(chunks)} model chunks (virtual pipeline stages); use build_model_chunks"
        )
    return chunks[0]


def build_model_chunks(cfg: GPTModelConfig, ctx) -> List[Tuple[object, object]]:
    """This rank's model chunks: one per virtual pipeline stage (``ctx.vp_size``), one without them.

    As Megatron's ``get_model``: chunk ``i`` of pipeline rank ``r`` holds the layers of virtual stage
    ``i * pp_size + r``; only chunk 0 of the first rank embeds and only the last chunk of the last rank
    holds the output layer and loss. All chunks share one TransformerConfig.

    Args:
        cfg: model shape.
        ctx: the ``platform.ParallelContext`` (tp/pp/vp sizes, this rank's stage).

    Returns:
        [(core, module)] in virtual-stage order: the megatron ``GPTModel`` (state dicts, parameters) and
        the module to wrap in DDP: the core itself in fp32, megatron's ``Float16Module`` around it with
        --bf16 or --fp16 (it casts the first stage's inputs to bf16/fp16 and the last stage's output
        back to fp32, as in Megatron's ``get_model``).
    """
    from megatron_dga import platform

    vp = ctx.vp_size if ctx.vp_size > 1 else None
    config = build_transformer_config(cfg, ctx.tp_size, ctx.pp_size, vp)
    chunks = []
    for stage in range(ctx.vp_size):
        # With several stages megatron's LanguageModule moves the tied embedding to CUDA to
        # all-reduce it between the first and last stage at construction.
        with platform.megatron_cuda_calls_on_cpu():
            core = build_gpt_model(
                cfg,
                ctx.tp_size,
                ctx.pp_size,
                config=config,
                vp_stage=stage if vp else None,
                pre_process=ctx.is_first_stage and stage == 0,
                post_process=ctx.is_last_stage and stage == ctx.vp_size - 1,
            )
        chunks.append((core, _precision_wrapper(cfg, core)))
    return chunks


def _precision_wrapper(cfg: GPTModelConfig, core):
    """The module DDP wraps: megatron's ``Float16Module`` around ``core`` with --bf16/--fp16, else ``core``."""
    if not (cfg.bf16 or cfg.fp16):
        return core
    from megatron.core.transformer.module import Float16Module

    return Float16Module(core.config, core)


def global_parameter_names(model) -> dict:
    """This rank's parameters under the names they have in the unsplit (one-stage) model.

    ``model``: a model, or the list of this rank's model chunks (virtual pipeline stages).
    Megatron numbers a chunk's layers from 0 in its module names; the global index comes
    from each layer's ``layer_number`` (1-based, offset by the pipeline and virtual stage). The
    last stage's tied copy of the word embedding (``output_layer.weight`` marked ``shared``) is
    left out: the first stage owns ``embedding.word_embeddings.weight``.
    """
    if isinstance(model, (list, tuple)):
        named = {}
        for chunk in model:
            named.update(global_parameter_names(chunk))
        return named
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
            name = offsets[prefix] + name[len(prefix) :]
        named[name] = param
    return named
