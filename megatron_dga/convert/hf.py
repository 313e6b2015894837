"""Hugging Face <-> megatron-dga checkpoints: Llama-family (Llama, Mistral, Qwen2) and GPT-2 models.

``to_megatron`` reads a local Hugging Face directory (``config.json`` and ``*.safetensors`` or
``pytorch_model*.bin``), maps it onto :class:`~megatron_dga.model.GPTModelConfig` (Megatron-LM's
flags) and writes a model-only torch_dist checkpoint through ``training/checkpoint.py``: megatron's
``dist_checkpointing`` reshards it onto any TP/PP layout at ``--load``. ``to_hf`` is the inverse,
from any torch_dist checkpoint of ours (converted or trained), for evaluation elsewhere.

The weight layouts megatron-core expects, and what this module does to Hugging Face's:

* attention: one fused ``linear_qkv`` whose rows are grouped by key/value group ``g``:
  ``[q heads of group g; k_g; v_g]`` for g = 0..G-1 (G = num_key_value_heads; GPT-2: G = heads, so
  ``[q_h; k_h; v_h]`` per head). Hugging Face keeps q, k, v apart (GPT-2: one ``c_attn`` of
  ``[q; k; v]``). RoPE: Hugging Face's Llama weights are laid out for ``rotate_half`` on the two
  halves of each head, which is megatron-core's ``rotary_interleaved=False`` (its default).
* SwiGLU: ``linear_fc1 = [gate; up]`` (megatron applies ``silu(first half) * second half``).
* GPT-2's ``Conv1D`` stores ``(in, out)``: transposed into megatron's ``(out, in)``; its GELU is
  the tanh approximation (``--openai-gelu``).
* norms: the local layer spec's ``input_layernorm``/``pre_mlp_layernorm`` modules (checkpointed
  under transformer-engine's fused names, so GPU runs load the same files).
* vocabulary: megatron pads the embedding (and untied output layer) to a multiple of
  ``--make-vocab-size-divisible-by`` x TP; padded rows are zero and dropped again by ``to_hf``.

Everything a Hugging Face config can say that megatron-core's GPTModel cannot do (another RoPE
scaling, a sliding window shorter than the sequence, biases on some linear layers only, an
architecture not listed in :data:`ARCHITECTURES`) is a ConfigError naming the file, the field,
the value and the fix, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_dga.errors import CheckpointError, ConfigError, DataError
from megatron_dga.fileio import atomic_copy, atomic_write_path, atomic_write_text, is_relative_inside
from megatron_dga.model import GPTModelConfig

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
}
"""Hugging Face ``architectures[0]`` -> ``model_type`` of the models this module converts."""

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The Llama 3.x RoPE scaling megatron-core implements (``rope_scaling=True``): only the factor varies."""

DEFAULT_SEQ_LENGTH = 4096
"""--seq-length when not given: the model's max_position_embeddings, at most this."""

MODEL_FLAGS_FILE = "model_flags.txt"
"""Written beside the converted checkpoint: the trainer's model flags, one line."""

_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
"""Files of a Hugging Face directory that are weights (not copied next to exported weights)."""


# ----------------------------------------------------------------------------- config mapping


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """``config.json`` of a local Hugging Face model directory, as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise DataError(
            f"--hf-dir {hf_dir}: not a directory; give a local Hugging Face model directory "
            "(save_pretrained's output, with config.json and the weights)"
        )
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {hf_dir} is not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def hf_architecture(hf: dict, where: str) -> str:
    """The supported ``model_type`` of config ``hf`` (``where``: its file, for errors)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: architectures {archs or None} (model_type {hf.get('model_type')!r}) is not supported; "
            f"the converter maps {', '.join(ARCHITECTURES)} onto megatron-core's GPTModel"
        )
    model_type = ARCHITECTURES[arch]
    if hf.get("model_type", model_type) != model_type:
        raise ConfigError(
            f"{where}: architectures [{arch!r}] with model_type {hf.get('model_type')!r}; expected "
            f"model_type {model_type!r}: fix config.json"
        )
    return model_type


def _field(hf: dict, name: str, where: str, kind=int, default=None):
    """``hf[name]`` as an int (or a float: ``kind=float``), or ConfigError naming the file and field."""
    value = hf.get(name, default)
    accepted = (int, float) if kind is float else int
    if not isinstance(value, accepted) or isinstance(value, bool):
        raise ConfigError(f"{where}: field {name} is {value!r}, expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def rope_settings(hf: dict, where: str) -> dict:
    """GPTModelConfig RoPE fields from a Llama-family config, old (``rope_theta`` + ``rope_scaling``)
    or new (``rope_parameters``) format."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(
            f"{where}: rope_parameters holds one RoPE per layer type ({sorted(params)}); "
            "megatron-core's GPTModel has one RoPE for every layer"
        )
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        field = "rope_parameters"
    else:
        params = hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", 10000.0)
        field = "rope_scaling"
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: field {field} is {params!r}, expected an object or null")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0 or float(theta) != int(theta):
        raise ConfigError(
            f"{where}: rope_theta {theta!r} is not a positive integer, which --rotary-base "
            "(Megatron's flag, an integer) needs"
        )
    out = {"rotary_base": int(theta)}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(
            f"{where}: partial_rotary_factor {partial} is not supported for Llama-family models "
            "(their Hugging Face code rotates every dimension); expected 1.0"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise ConfigError(
            f"{where}: {field} rope_type {rope_type!r} is not supported: megatron-core's GPTModel implements "
            "Llama 3's RoPE scaling only (rope_type 'llama3', --use-rope-scaling); convert a model without it, "
            "or with rope_type llama3"
        )
    for key, expected in LLAMA3_ROPE.items():
        if key in params and float(params[key]) != expected:
            raise ConfigError(
                f"{where}: {field} {key} is {params[key]}, but megatron-core's Llama 3 RoPE scaling fixes it at "
                f"{expected:g} (only the factor is a flag, --rope-scaling-factor); this model cannot be converted"
            )
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f"{where}: {field} factor is {factor!r}, expected a number > 0")
    out.update(use_rope_scaling=True, rope_scaling_factor=float(factor))
    return out


def model_config_from_hf(
    hf: dict,
    where: str,
    *,
    seq_length: Optional[int] = None,
    vocab_size: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
) -> GPTModelConfig:
    """The GPTModelConfig (Megatron-LM's flags) of a Hugging Face config.

    Args:
        hf: ``config.json`` as a dict.
        where: its path, for error messages.
        seq_length: --seq-length; default: max_position_embeddings, at most :data:`DEFAULT_SEQ_LENGTH`.
        vocab_size: the tokenizer's vocabulary (what the trainer's ``vocab_size`` will be);
            default: the config's ``vocab_size``.
        make_vocab_size_divisible_by: --make-vocab-size-divisible-by.
    """
    kind = hf_architecture(hf, where)
    common = _gpt2_fields(hf, where) if kind == "gpt2" else _llama_fields(hf, where, kind)
    max_pos = common["max_position_embeddings"]
    seq = min(max_pos, DEFAULT_SEQ_LENGTH) if seq_length is None else seq_length
    if seq > max_pos:
        raise ConfigError(
            f"--seq-length {seq} exceeds max_position_embeddings {max_pos} of {where}; "
            f"use --seq-length {max_pos} or less"
        )
    window = sliding_window(hf, kind)
    if window is not None and window < seq:
        raise ConfigError(
            f"{where}: sliding_window {window} is shorter than --seq-length {seq}, and megatron-core's "
            f"GPTModel has no sliding-window attention; use --seq-length {window} or less (the window "
            "then changes nothing)"
        )
    hf_vocab = _field(hf, "vocab_size", where)
    vocab = hf_vocab if vocab_size is None else vocab_size
    if vocab > hf_vocab:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but {where} has vocab_size {hf_vocab} embedding rows: "
            "ids past the embedding; use the model's own tokenizer"
        )
    return GPTModelConfig(
        seq_length=seq, vocab_size=vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by, **common
    )


def _llama_fields(hf: dict, where: str, kind: str) -> dict:
    h = _field(hf, "hidden_size", where)
    heads = _field(hf, "num_attention_heads", where)
    groups = heads if hf.get("num_key_value_heads") is None else _field(hf, "num_key_value_heads", where)
    head_dim = None if hf.get("head_dim") is None else _field(hf, "head_dim", where)
    if head_dim is None:
        if h % heads:
            raise ConfigError(
                f"{where}: hidden_size {h} is not divisible by num_attention_heads {heads} and head_dim is unset"
            )
        head_dim = h // heads
    if heads % groups:
        raise ConfigError(f"{where}: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(
            f"{where}: hidden_act {act!r} is not supported for {kind}: megatron's --swiglu is "
            "SiLU-gated; expected 'silu'"
        )
    if kind == "qwen2":
        bias = {"disable_bias_linear": True, "add_qkv_bias": True}  # Qwen2: q/k/v biases only
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ConfigError(
                f"{where}: attention_bias {attention_bias} with mlp_bias {mlp_bias}: megatron-core's "
                "--disable-bias-linear turns the attention and MLP biases on or off together (--add-qkv-bias "
                "adds q/k/v biases only, not the output projection's); this model cannot be converted"
            )
        bias = {"disable_bias_linear": not attention_bias}
    max_pos = _field(hf, "max_position_embeddings", where)
    return dict(
        num_layers=_field(hf, "num_hidden_layers", where),
        hidden_size=h,
        num_attention_heads=heads,
        ffn_hidden_size=_field(hf, "intermediate_size", where),
        max_position_embeddings=max_pos,
        position_embedding_type="rope",
        normalization="RMSNorm",
        norm_epsilon=_field(hf, "rms_norm_eps", where, float, 1e-6),
        swiglu=True,
        untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
        group_query_attention=groups != heads,
        num_query_groups=groups if groups != heads else None,
        kv_channels=head_dim if head_dim * heads != h else None,
        **bias,
        **rope_settings(hf, where),
    )


def sliding_window(hf: dict, kind: str) -> Optional[int]:
    """The attention window of a Mistral / Qwen2 config (None: full attention)."""
    if kind == "mistral" or (kind == "qwen2" and hf.get("use_sliding_window")):
        return hf.get("sliding_window")
    return None


def _gpt2_fields(hf: dict, where: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ConfigError(
            f"{where}: activation_function {act!r} is not supported; megatron-core runs GELU "
            "(gelu, or its tanh approximation gelu_new with --openai-gelu)"
        )
    for name, expected in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if bool(hf.get(name, expected)) != expected:
            raise ConfigError(
                f"{where}: {name} {hf.get(name)!r} is not supported (megatron-core's attention "
                f"is a plain 1/sqrt(head dim) softmax): expected {expected}"
            )
    h = _field(hf, "n_embd", where)
    n_inner = hf.get("n_inner")
    return dict(
        num_layers=_field(hf, "n_layer", where),
        hidden_size=h,
        num_attention_heads=_field(hf, "n_head", where),
        ffn_hidden_size=4 * h if n_inner is None else _field(hf, "n_inner", where),
        max_position_embeddings=_field(hf, "n_positions", where),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        norm_epsilon=_field(hf, "layer_norm_epsilon", where, float, 1e-5),
        openai_gelu=act != "gelu",
        untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", True)),
    )


def hf_config_from_model(
    cfg: GPTModelConfig, kind: str, *, vocab_size: int, dtype: torch.dtype, base: Optional[dict] = None
) -> dict:
    """The Hugging Face ``config.json`` of ``cfg`` as architecture ``kind``.

    ``base`` (the original model's config) keeps everything the flags do not say (token ids,
    generation settings, its RoPE field format); the fields below replace its values.
    """
    dtype_name = _HF_DTYPE_NAMES[dtype]
    if kind == "gpt2":
        fresh = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads,
            "n_positions": cfg.max_position_embeddings,
            "n_inner": cfg.ffn_size,
            "activation_function": "gelu_new" if cfg.openai_gelu else "gelu",
            "layer_norm_epsilon": cfg.norm_epsilon,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        }
    else:
        arch = next(a for a, k in ARCHITECTURES.items() if k == kind)
        rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base or 10000)}
        if cfg.use_rope_scaling:
            rope.update(rope_type="llama3", factor=float(cfg.rope_scaling_factor or 8.0), **LLAMA3_ROPE)
        fresh = {
            "architectures": [arch],
            "model_type": kind,
            "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.ffn_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.query_groups,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.norm_epsilon,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        }
        if cfg.kv_channels is None and "head_dim" not in (base or {}):
            del fresh["head_dim"]  # hidden / heads, Hugging Face's default
        if base is not None and isinstance(base.get("rope_parameters"), dict):
            fresh["rope_parameters"] = rope
        else:
            fresh["rope_theta"] = rope["rope_theta"]
            fresh["rope_scaling"] = (
                None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
            )
        if kind == "llama":
            fresh["attention_bias"] = fresh["mlp_bias"] = not cfg.disable_bias_linear
        if kind == "qwen2":
            fresh["use_sliding_window"] = bool((base or {}).get("use_sliding_window", False))
        if kind == "mistral":  # Hugging Face's default is a 4096-token window; ours attends to everything
            fresh["sliding_window"] = (base or {}).get("sliding_window")
    config = {**(base or {}), **fresh}
    config["torch_dtype" if "dtype" not in config else "dtype"] = dtype_name
    return config


def architecture_for(cfg: GPTModelConfig) -> str:
    """The Hugging Face architecture that computes what ``cfg`` computes (``to_hf`` without a reference)."""
    if (
        cfg.position_embedding_type == "learned_absolute"
        and cfg.normalization == "LayerNorm"
        and not cfg.swiglu
        and not cfg.disable_bias_linear
        and not cfg.group_query_attention
        and cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
    ):
        return "gpt2"
    if (
        cfg.position_embedding_type == "rope"
        and cfg.normalization == "RMSNorm"
        and cfg.swiglu
        and cfg.rotary_percent in (None, 1.0)
    ):
        # Qwen2: q/k/v biases only; Llama: no biases, or (attention_bias and mlp_bias) all of them.
        return "qwen2" if cfg.disable_bias_linear and cfg.add_qkv_bias else "llama"
    raise ConfigError(
        f"no supported Hugging Face architecture computes this model (--position-embedding-type "
        f"{cfg.position_embedding_type}, --normalization {cfg.normalization}, swiglu={cfg.swiglu}, "
        f"disable_bias_linear={cfg.disable_bias_linear}, add_qkv_bias={cfg.add_qkv_bias}, rotary_percent="
        f"{cfg.rotary_percent}): GPT2LMHeadModel is learned positions + LayerNorm + GELU with biases, "
        "LlamaForCausalLM/Qwen2ForCausalLM are RoPE + RMSNorm + SwiGLU over all dimensions"
    )


# ----------------------------------------------------------------------------- flags


_FLAG_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "group_query_attention",
    "num_query_groups",
    "kv_channels",
    "seq_length",
    "max_position_embeddings",
    "position_embedding_type",
    "normalization",
    "norm_epsilon",
    "swiglu",
    "openai_gelu",
    "disable_bias_linear",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "rotary_base",
    "rotary_percent",
    "use_rope_scaling",
    "rope_scaling_factor",
    "make_vocab_size_divisible_by",
)
_ALWAYS = {
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "seq_length",
    "max_position_embeddings",
    "position_embedding_type",
    "normalization",
    "norm_epsilon",
}


def model_flags(cfg: GPTModelConfig) -> List[str]:
    """The trainer's command-line flags that rebuild ``cfg`` (the vocabulary comes from the tokenizer)."""
    defaults = GPTModelConfig()
    flags: List[str] = []
    for name in _FLAG_FIELDS:
        value = getattr(cfg, name)
        if name not in _ALWAYS and value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    return flags


def model_flag_values(argv: List[str]) -> Dict[str, object]:
    """{field: value} of the trainer's model flags in ``argv`` (those given only); others are an error."""
    from megatron_dga.training.arguments import build_parser

    ns, unknown = build_parser().parse_known_args(argv)
    given = vars(ns)
    other = [key for key in given if "." in key and not key.startswith("model.")]
    if unknown or other:
        names = unknown + ["--" + key.split(".", 1)[1].replace("_", "-") for key in other]
        raise ConfigError(
            f"{' '.join(names)}: not a model flag; give the model flags of the training run "
            f"(e.g. the contents of {MODEL_FLAGS_FILE} written by the conversion)"
        )
    return {key.split(".", 1)[1]: value for key, value in given.items() if key.startswith("model.")}


# ----------------------------------------------------------------------------- Hugging Face weight files


class HFWeights:
    """The tensors of a Hugging Face directory, read one at a time (safetensors, or torch ``.bin`` files)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._files: Dict[str, Path] = {}
        self._open: Dict[Path, object] = {}
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = self.dir / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                    items = list(weight_map.items())
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise DataError(f"cannot read the weight index {index}: {exc!r}") from None
                outside = [(name, file) for name, file in items if not is_relative_inside(file)]
                if outside:
                    raise DataError(
                        f"the weight index {index} maps {outside[0][0]!r} to {outside[0][1]!r}, not a "
                        f"file inside {self.dir} (an absolute path or one through '..'); the converter "
                        "reads only the model directory's own files: fix weight_map"
                    )
                self._files = {name: self.dir / file for name, file in items}
                break
            if (self.dir / single).is_file():
                self._files = dict.fromkeys(self._names_in(self.dir / single), self.dir / single)
                break
        if not self._files:
            found = sorted(p.name for p in self.dir.iterdir()) if self.dir.is_dir() else []
            raise DataError(
                f"{self.dir} holds no Hugging Face weights (model.safetensors[.index.json] or "
                f"pytorch_model.bin[.index.json]); found {found[:12]}"
            )
        missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
        if missing:
            raise DataError(f"weight files listed in {self.dir}'s index are missing: {missing[:4]}")

    def names(self) -> set:
        return set(self._files)

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                try:
                    from safetensors import safe_open
                except ImportError:
                    raise ConfigError(
                        f"{path} is a safetensors file and the 'safetensors' package is not installed; "
                        "pip install safetensors (requirements/cpu.txt pins it)"
                    ) from None
                try:
                    self._open[path] = safe_open(str(path), framework="pt", device="cpu")
                except Exception as exc:
                    raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
            else:
                try:
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        return self._open[path]

    def _names_in(self, path: Path) -> list:
        return list(self._handle(path).keys())

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        handle = self._handle(path)
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]


# ----------------------------------------------------------------------------- weight layouts


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows ``[q heads of group g; k_g; v_g]`` for g = 0..groups-1 (weights or biases)."""
    rest = q.shape[1:]
    d = q.shape[0] // heads
    q = q.reshape(groups, heads // groups * d, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: (q, k, v)."""
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (heads + 2 * groups)
    per_group = heads // groups
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return q.reshape(heads * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` cut or zero-padded to ``rows`` rows (the vocabulary dimension)."""
    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _llama_names(i: int) -> Dict[str, str]:
    p = f"model.layers.{i}."
    return {
        name: p + name
        for name in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.bias",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "mlp.gate_proj.bias",
            "mlp.up_proj.bias",
            "mlp.down_proj.bias",
        )
    }


def hf_to_megatron(
    cfg: GPTModelConfig, kind: str, hf_names: set, get, padded_vocab: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(megatron name, tensor) of every parameter of the one-stage model, from Hugging Face tensors.

    Args:
        cfg: the converted model's config.
        kind: :data:`ARCHITECTURES` value.
        hf_names: the tensor names present (prefixes and optional tensors are resolved against it).
        get: name -> tensor.
        padded_vocab: rows of megatron's (padded) embedding and output layer.
    """
    if kind == "gpt2":
        yield from _gpt2_to_megatron(cfg, hf_names, get, padded_vocab)
        return
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    has_bias = not cfg.disable_bias_linear
    yield "embedding.word_embeddings.weight", _resize_rows(get("model.embed_tokens.weight"), padded_vocab)
    for i in range(cfg.num_layers):
        n = _llama_names(i)
        m = f"decoder.layers.{i}."
        yield m + "input_layernorm.weight", get(n["input_layernorm.weight"])
        yield (
            m + "self_attention.linear_qkv.weight",
            fuse_qkv(
                get(n["self_attn.q_proj.weight"]),
                get(n["self_attn.k_proj.weight"]),
                get(n["self_attn.v_proj.weight"]),
                heads,
                groups,
            ),
        )
        if has_bias or cfg.add_qkv_bias:
            yield (
                m + "self_attention.linear_qkv.bias",
                fuse_qkv(
                    get(n["self_attn.q_proj.bias"]),
                    get(n["self_attn.k_proj.bias"]),
                    get(n["self_attn.v_proj.bias"]),
                    heads,
                    groups,
                ),
            )
        yield m + "self_attention.linear_proj.weight", get(n["self_attn.o_proj.weight"])
        yield m + "pre_mlp_layernorm.weight", get(n["post_attention_layernorm.weight"])
        yield m + "mlp.linear_fc1.weight", torch.cat([get(n["mlp.gate_proj.weight"]), get(n["mlp.up_proj.weight"])])
        yield m + "mlp.linear_fc2.weight", get(n["mlp.down_proj.weight"])
        if has_bias:
            yield m + "self_attention.linear_proj.bias", get(n["self_attn.o_proj.bias"])
            yield m + "mlp.linear_fc1.bias", torch.cat([get(n["mlp.gate_proj.bias"]), get(n["mlp.up_proj.bias"])])
            yield m + "mlp.linear_fc2.bias", get(n["mlp.down_proj.bias"])
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if cfg.untie_embeddings_and_output_weights:
        yield "output_layer.weight", _resize_rows(get("lm_head.weight"), padded_vocab)


def _gpt2_prefix(hf_names: set) -> str:
    return "transformer." if "transformer.wte.weight" in hf_names else ""


def _gpt2_to_megatron(cfg, hf_names, get, padded_vocab):
    p = _gpt2_prefix(hf_names)
    heads = cfg.num_attention_heads
    yield "embedding.word_embeddings.weight", _resize_rows(get(p + "wte.weight"), padded_vocab)
    yield "embedding.position_embeddings.weight", get(p + "wpe.weight")
    for i in range(cfg.num_layers):
        h, m = f"{p}h.{i}.", f"decoder.layers.{i}."
        for hf_norm, ours in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            yield m + ours + ".weight", get(h + hf_norm + ".weight")
            yield m + ours + ".bias", get(h + hf_norm + ".bias")
        q, k, v = get(h + "attn.c_attn.weight").t().chunk(3)  # Conv1D (in, out) -> (out, in)
        yield m + "self_attention.linear_qkv.weight", fuse_qkv(q, k, v, heads, heads)
        yield m + "self_attention.linear_qkv.bias", fuse_qkv(*get(h + "attn.c_attn.bias").chunk(3), heads, heads)
        yield m + "self_attention.linear_proj.weight", get(h + "attn.c_proj.weight").t()
        yield m + "self_attention.linear_proj.bias", get(h + "attn.c_proj.bias")
        yield m + "mlp.linear_fc1.weight", get(h + "mlp.c_fc.weight").t()
        yield m + "mlp.linear_fc1.bias", get(h + "mlp.c_fc.bias")
        yield m + "mlp.linear_fc2.weight", get(h + "mlp.c_proj.weight").t()
        yield m + "mlp.linear_fc2.bias", get(h + "mlp.c_proj.bias")
    yield "decoder.final_layernorm.weight", get(p + "ln_f.weight")
    yield "decoder.final_layernorm.bias", get(p + "ln_f.bias")
    if cfg.untie_embeddings_and_output_weights:
        yield "output_layer.weight", _resize_rows(get("lm_head.weight"), padded_vocab)


def megatron_to_hf(
    cfg: GPTModelConfig, kind: str, state: Dict[str, torch.Tensor], hf_vocab: int
) -> Dict[str, torch.Tensor]:
    """Hugging Face tensors (names as ``save_pretrained`` writes them) from the one-stage model's ``state``."""
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    out: Dict[str, torch.Tensor] = {}
    tied = not cfg.untie_embeddings_and_output_weights
    if kind == "gpt2":
        out["transformer.wte.weight"] = _resize_rows(state["embedding.word_embeddings.weight"], hf_vocab)
        out["transformer.wpe.weight"] = state["embedding.position_embeddings.weight"]
        for i in range(cfg.num_layers):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for hf_norm, ours in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[h + hf_norm + ".weight"] = state[m + ours + ".weight"]
                out[h + hf_norm + ".bias"] = state[m + ours + ".bias"]
            q, k, v = split_qkv(state[m + "self_attention.linear_qkv.weight"], heads, heads)
            out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).t()
            qkv_bias = split_qkv(state[m + "self_attention.linear_qkv.bias"], heads, heads)
            out[h + "attn.c_attn.bias"] = torch.cat(qkv_bias)
            out[h + "attn.c_proj.weight"] = state[m + "self_attention.linear_proj.weight"].t()
            out[h + "attn.c_proj.bias"] = state[m + "self_attention.linear_proj.bias"]
            out[h + "mlp.c_fc.weight"] = state[m + "mlp.linear_fc1.weight"].t()
            out[h + "mlp.c_fc.bias"] = state[m + "mlp.linear_fc1.bias"]
            out[h + "mlp.c_proj.weight"] = state[m + "mlp.linear_fc2.weight"].t()
            out[h + "mlp.c_proj.bias"] = state[m + "mlp.linear_fc2.bias"]
        out["transformer.ln_f.weight"] = state["decoder.final_layernorm.weight"]
        out["transformer.ln_f.bias"] = state["decoder.final_layernorm.bias"]
    else:
        has_bias = not cfg.disable_bias_linear
        out["model.embed_tokens.weight"] = _resize_rows(state["embedding.word_embeddings.weight"], hf_vocab)
        for i in range(cfg.num_layers):
            n, m = _llama_names(i), f"decoder.layers.{i}."
            out[n["input_layernorm.weight"]] = state[m + "input_layernorm.weight"]
            kinds = ("weight", "bias") if has_bias or cfg.add_qkv_bias else ("weight",)
            for kind_ in kinds:
                q, k, v = split_qkv(state[m + "self_attention.linear_qkv." + kind_], heads, groups)
                for proj, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[n[f"self_attn.{proj}.{kind_}"]] = t
            out[n["self_attn.o_proj.weight"]] = state[m + "self_attention.linear_proj.weight"]
            out[n["post_attention_layernorm.weight"]] = state[m + "pre_mlp_layernorm.weight"]
            gate, up = state[m + "mlp.linear_fc1.weight"].chunk(2)
            out[n["mlp.gate_proj.weight"]], out[n["mlp.up_proj.weight"]] = gate, up
            out[n["mlp.down_proj.weight"]] = state[m + "mlp.linear_fc2.weight"]
            if has_bias:
                out[n["self_attn.o_proj.bias"]] = state[m + "self_attention.linear_proj.bias"]
                gate, up = state[m + "mlp.linear_fc1.bias"].chunk(2)
                out[n["mlp.gate_proj.bias"]], out[n["mlp.up_proj.bias"]] = gate, up
                out[n["mlp.down_proj.bias"]] = state[m + "mlp.linear_fc2.bias"]
        out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    if not tied:
        out["lm_head.weight"] = _resize_rows(state["output_layer.weight"], hf_vocab)
    return out


def _ignored_hf_tensor(name: str, kind: str, tied: bool) -> bool:
    """Hugging Face tensors that are not weights of the model (buffers, or the tied head's copy)."""
    if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
        return True
    return tied and name == "lm_head.weight"


# ----------------------------------------------------------------------------- checkpoints


def _require_one_process() -> None:
    from megatron.core import parallel_state

    from megatron_dga import comm

    if not parallel_state.model_parallel_is_initialized() or comm.size() != 1:
        raise ConfigError(
            "the Hugging Face converter runs as one process (python tools/convert_hf_checkpoint.py, "
            "not torchrun): the torch_dist checkpoint it writes reshards onto any TP/PP layout at --load"
        )


def _one_process_model(cfg: GPTModelConfig, padded_vocab: int, dtype: torch.dtype):
    """The whole model on this process, its vocabulary padded to ``padded_vocab`` rows, uninitialised."""
    from megatron_dga import platform
    from megatron_dga.model import FUSION_FLAGS, build_gpt_model

    # make_vocab_size_divisible_by = padded_vocab pads any vocabulary <= padded_vocab to exactly it. The local
    # layer spec (the parameter names the mappings use) on any machine, without the flags that need
    # transformer-engine layers (fusions included); no recomputation (there is no forward here).
    backend = "auto" if cfg.effective_attention_backend in ("flash", "fused", "unfused") else cfg.attention_backend
    shape = dataclasses.replace(
        cfg,
        make_vocab_size_divisible_by=padded_vocab,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        attention_backend=backend,
        use_flash_attn=False,
        sequence_parallel=False,
        recompute_activations=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        **{name: False for name in FUSION_FLAGS},
    )
    with platform.megatron_cuda_calls_on_cpu():
        return build_gpt_model(shape, initialize=False, use_transformer_engine=False)


def tokenizer_vocab_size(hf_dir: str | os.PathLike) -> Optional[int]:
    """Tokens of the directory's ``tokenizer.json`` as ``--tokenizer-type HuggingFaceTokenizer`` counts them
    (None, with a warning, where the trainer could not load it)."""
    from megatron_dga.data.tokenizers import build_tokenizer

    if not (Path(hf_dir) / "tokenizer.json").is_file():
        logger.warning(
            "%s has no tokenizer.json: the checkpoint's vocabulary is config.json's vocab_size; train "
            "with a tokenizer of exactly that many tokens",
            hf_dir,
        )
        return None
    try:
        return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(hf_dir)).vocab_size
    except (ConfigError, DataError) as exc:
        logger.warning("the trainer cannot load the tokenizer of %s (%s); using config.json's vocab_size", hf_dir, exc)
        return None


def source_dtype(hf: dict) -> torch.dtype:
    """bf16 for bf16 sources, fp32 otherwise (fp16 widens: the trainer refuses --fp16)."""
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return torch.bfloat16 if name in ("bfloat16", "torch.bfloat16") else torch.float32


def _check_output_dir(out_dir: Path, flag: str) -> None:
    """``out_dir`` is new or empty (a conversion writes only new files: never over, or through a link
    planted in, anything already there) and writable."""
    from megatron_dga.fileio import ensure_writable_dir

    if out_dir.is_dir():
        taken = sorted(p.name for p in out_dir.iterdir())
        if taken:
            raise ConfigError(
                f"{flag} {out_dir} is not empty (it holds {taken[:3]}); give a new or empty directory "
                "(a conversion never writes over or into existing files)"
            )
    ensure_writable_dir(out_dir, flag)


def to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seq_length: Optional[int] = None,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[torch.dtype] = None,
) -> dict:
    """Convert a local Hugging Face model directory into a model-only torch_dist checkpoint of ours.

    Writes ``out_dir/latest_checkpointed_iteration.txt``, ``out_dir/iter_0000000/`` (megatron's
    ``dist_checkpointing`` files + ``megatron_dga.json`` whose ``extra`` holds the facts below) and
    ``out_dir/model_flags.txt`` (the trainer's model flags). Needs megatron's parallel state of one
    process (``platform.initialize``).

    Args:
        hf_dir: ``save_pretrained``'s output (config.json, weights; tokenizer.json if any).
        out_dir: new or empty directory (the trainer's ``--load``).
        seq_length: --seq-length written into the flags (default: max_position_embeddings, at most 4096).
        tensor_model_parallel_size, pipeline_model_parallel_size: the layout the training run will
            use, checked against the model; TP also sets the vocabulary padding (multiple of
            make_vocab_size_divisible_by x TP), which must be the training run's.
        make_vocab_size_divisible_by: --make-vocab-size-divisible-by of the training run.
        dtype: torch.float32 or torch.bfloat16; default: bf16 for a bf16 source, fp32 otherwise.

    Returns:
        The facts written into the checkpoint metadata (``extra``).
    """
    from megatron_dga.training import checkpoint as ckpt
    from megatron_dga.training.resume import MODEL_SHAPE_FLAGS

    _require_one_process()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    kind = hf_architecture(hf, where)
    weights = HFWeights(hf_dir)
    tok_vocab = tokenizer_vocab_size(hf_dir)
    cfg = model_config_from_hf(
        hf,
        where,
        seq_length=seq_length,
        vocab_size=tok_vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    cfg.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    padded = cfg.padded_vocab_size(tensor_model_parallel_size)
    hf_vocab = int(hf["vocab_size"])
    if padded < hf_vocab:
        logger.warning(
            "embedding rows %d..%d of %s are past the tokenizer's %d tokens and the padded vocabulary "
            "(%d rows): dropped (no token reaches them)",
            padded,
            hf_vocab - 1,
            hf_dir,
            cfg.vocab_size,
            padded,
        )
    dtype = dtype or source_dtype(hf)
    _check_output_dir(out_dir, "--output")

    model = _one_process_model(cfg, padded, dtype)
    params = dict(model.named_parameters())
    tied = not cfg.untie_embeddings_and_output_weights
    hf_names = weights.names()
    used, assigned = set(), set()

    def get(name: str) -> torch.Tensor:
        if name not in hf_names:
            raise DataError(
                f"{hf_dir}: tensor {name} is missing, which {hf['architectures'][0]} with this "
                "config.json needs; the weights do not match config.json"
            )
        used.add(name)
        return weights.get(name)

    with torch.no_grad():
        for name, tensor in hf_to_megatron(cfg, kind, hf_names, get, padded):
            param = params.get(name)
            if param is None or tuple(param.shape) != tuple(tensor.shape):
                raise DataError(
                    f"{hf_dir}: {name} would get shape {tuple(tensor.shape)} but the model of "
                    f"config.json has {None if param is None else tuple(param.shape)}; the weights do "
                    "not match config.json"
                )
            param.copy_(tensor)
            assigned.add(name)
    unassigned = sorted(set(params) - assigned)
    if unassigned:  # a mapping gap: never save random or empty weights
        raise CheckpointError(f"internal: parameters {unassigned[:4]} got no Hugging Face tensor")
    extra_names = sorted(n for n in hf_names - used if not _ignored_hf_tensor(n, kind, tied))
    if extra_names:
        raise ConfigError(
            f"{hf_dir}: tensors {extra_names[:4]} ({len(extra_names)} in all) have no place in the "
            "megatron model of config.json (an architecture variant the converter does not map)"
        )

    flags = model_flags(cfg)
    facts = {
        "contents": ["model"],
        "model": {name: getattr(cfg, name) for name in MODEL_SHAPE_FLAGS},
        "seq_length": cfg.seq_length,
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "model_flags": flags,
        "converted_from": {
            "format": "huggingface",
            "path": str(hf_dir.resolve()),
            "architecture": hf["architectures"][0],
            "vocab_size": hf_vocab,
            "dtype": _HF_DTYPE_NAMES[dtype],
        },
    }
    ckpt.save_distributed_checkpoint(out_dir, 0, {"model": model.sharded_state_dict()}, metadata=facts)
    atomic_write_text(out_dir / MODEL_FLAGS_FILE, shlex.join(flags) + "\n")
    return facts


def reshardable_tp_sizes(cfg: GPTModelConfig, padded: int, candidates=(1, 2, 4, 8)) -> List[int]:
    """Tensor-parallel sizes whose vocabulary padding equals ``padded`` (and that the model allows)."""
    sizes = []
    for tp in candidates:
        try:
            cfg.check_parallel(tp, 1)
        except ConfigError:
            continue
        if cfg.padded_vocab_size(tp) == padded:
            sizes.append(tp)
    return sizes


def to_hf(
    load_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_flags_given: Optional[dict] = None,
    reference_dir: Optional[str | os.PathLike] = None,
    tokenizer_dir: Optional[str | os.PathLike] = None,
    architecture: Optional[str] = None,
    ckpt_step: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write a Hugging Face model directory (config.json, safetensors) from a torch_dist checkpoint of ours.

    The model's config comes from ``reference_dir``'s config.json (the model it was converted
    from: token ids, RoPE format and everything else carried over) and/or the trainer's model
    flags (``model_flags_given``, {field: value}, which override it); the checkpoint's own facts
    (vocabulary, shapes) are checked against them.

    Beside config.json goes ``mixture_history.json`` (mixing/export.py): the training run's domain
    weights over time and tokens per domain up to the exported iteration, when the run's --log-dir
    is ``load_dir`` or its parent.

    Args:
        load_dir: the checkpoint root (the trainer's --save / --load).
        out_dir: new or empty directory.
        model_flags_given: the training run's model flags as {field: value} (:func:`model_flag_values`).
        reference_dir: the original Hugging Face directory; its tokenizer files are copied too.
        tokenizer_dir: tokenizer files to copy (default: reference_dir's).
        architecture: Hugging Face architecture (default: the reference's, else derived from the flags).
        ckpt_step: the iteration to convert (default: the latest).
        dtype: of the written tensors; default: the reference's, else the checkpoint's.
    """
    from megatron_dga.training import checkpoint as ckpt
    from megatron_dga.training.resume import MODEL_SHAPE_FLAGS

    _require_one_process()
    ckpt_dir, meta = ckpt.resolve_checkpoint(load_dir, ckpt_step)
    if meta.get("ckpt_format") != "torch_dist":
        raise ConfigError(
            f"--load {load_dir}: {ckpt_dir} is a {meta.get('ckpt_format', 'torch')!r} checkpoint; "
            "the converter reads torch_dist (resume it once and save with --ckpt-format torch_dist)"
        )
    out_dir = Path(out_dir)
    extra = meta.get("extra", {})
    saved_model = extra.get("model", {})
    base = read_hf_config(reference_dir) if reference_dir else None
    values: Dict[str, object] = {}
    if base is not None:
        where = str(Path(reference_dir) / "config.json")
        # seq_length=1: the sequence is the training run's choice, set below (and no window check here).
        base_cfg = model_config_from_hf(base, where, seq_length=1)
        values = {f.name: getattr(base_cfg, f.name) for f in dataclasses.fields(GPTModelConfig)}
    elif not model_flags_given:
        raise ConfigError(
            "give the model: --hf-reference DIR (the Hugging Face model it was converted from) and/or "
            f"the training run's model flags (e.g. $(cat CONVERTED/{MODEL_FLAGS_FILE}))"
        )
    values.update(model_flags_given or {})
    values["vocab_size"] = saved_model.get("vocab_size", values.get("vocab_size", 0))
    if "seq_length" not in (model_flags_given or {}):  # only checked against max_position_embeddings here
        values["seq_length"] = values.get("max_position_embeddings") or extra.get("seq_length") or 128
    cfg = GPTModelConfig(**values)
    for name, flag in MODEL_SHAPE_FLAGS.items():
        if name in saved_model and saved_model[name] != getattr(cfg, name):
            from_reference = base is not None and name not in (model_flags_given or {})
            source = "--hf-reference config.json" if from_reference else flag
            raise ConfigError(
                f"{flag}: the checkpoint {ckpt_dir} has {saved_model[name]!r}, {source} gives "
                f"{getattr(cfg, name)!r}; give the training run's model flags"
            )
    kind = ARCHITECTURES.get(architecture) if architecture else hf_architecture(base, where) if base else None
    if architecture and kind is None:
        raise ConfigError(f"--hf-architecture {architecture!r} is not supported; one of {', '.join(ARCHITECTURES)}")
    derived = architecture_for(cfg)  # what the flags compute; Mistral computes what Llama does
    if kind is None:
        kind = derived
    elif derived != {"mistral": "llama"}.get(kind, kind):
        named = architecture or base["architectures"][0]
        raise ConfigError(
            f"the model flags describe what {derived} computes, not {named}; fix the flags or --hf-architecture"
        )

    _check_output_dir(out_dir, "--output")
    # Checksums and the restricted unpickling of what torch will read, before anything reads the checkpoint.
    saved = ckpt.verify_checkpoint(ckpt_dir, meta).state_dict_metadata
    embedding = saved.get("embedding.word_embeddings.weight")
    if getattr(embedding, "size", None) is None:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds no embedding.word_embeddings.weight tensor: not a GPT "
            "model checkpoint of ours"
        )
    padded, saved_dtype = int(embedding.size[0]), embedding.properties.dtype
    # The Hugging Face embedding's rows: the reference's, else the converted source's, else the vocabulary.
    hf_vocab = int(base["vocab_size"] if base else extra.get("converted_from", {}).get("vocab_size", cfg.vocab_size))
    if padded < cfg.vocab_size:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: its embedding has {padded} rows, fewer than the vocabulary ({cfg.vocab_size})"
        )
    model = _one_process_model(cfg, padded, saved_dtype)
    state = ckpt.load_distributed_checkpoint(ckpt_dir, meta, {"model": model.sharded_state_dict()}, verified=True)
    model.load_state_dict(state["model"])
    tensors = {name: t.detach() for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    hf_state = megatron_to_hf(cfg, kind, tensors, hf_vocab)
    out_dtype = dtype or (source_dtype(base) if base else saved_dtype)
    hf_state = {name: t.to(out_dtype).contiguous() for name, t in hf_state.items()}
    config = hf_config_from_model(cfg, kind, vocab_size=hf_vocab, dtype=out_dtype, base=base)
    tok_source = tokenizer_dir or reference_dir
    if base is None and tok_source:
        config.update(_token_ids(tok_source))
    _write_hf(out_dir, config, hf_state)
    if tok_source:
        _copy_side_files(Path(tok_source), out_dir)
    _write_mixture_history(load_dir, out_dir, int(meta["iteration"]))
    return out_dir


def _write_mixture_history(load_dir, out_dir: Path, iteration: int) -> None:
    """``mixture_history.json`` beside config.json: the training run's domain weights over time and tokens
    per domain up to the exported iteration (mixing/export.py), when its --log-dir is ``load_dir`` or its
    parent (run_info.json names ``load_dir`` as --save); a converted model without training logs has none."""
    from megatron_dga.mixing import export

    try:
        doc = export.mixture_history(export.find_log_dir(load_dir), up_to=iteration)
    except DataError as exc:
        logger.info("no %s written: %s", export.HISTORY_FILENAME, exc)
        return
    doc["checkpoint_iteration"] = iteration
    atomic_write_text(out_dir / export.HISTORY_FILENAME, json.dumps(doc, indent=1) + "\n")


def _token_ids(tokenizer_dir) -> dict:
    from megatron_dga.data.tokenizers import build_tokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tokenizer_dir))
    ids = {"eos_token_id": tok.eod}
    if tok.bos is not None:
        ids["bos_token_id"] = tok.bos
    return ids


def _copy_side_files(source: Path, out_dir: Path) -> None:
    """Tokenizer and generation files of ``source`` (top-level, everything but weights and config.json)."""
    for entry in sorted(source.iterdir()):
        if (
            entry.is_file()
            and entry.name != "config.json"
            and not entry.name.endswith(_WEIGHT_SUFFIXES)
            and not entry.name.endswith(".index.json")
        ):
            atomic_copy(entry, out_dir / entry.name)


def _write_hf(out_dir: Path, config: dict, tensors: Dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json and safetensors files (sharded with an index past ``max_shard_bytes``, as save_pretrained)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError(
            "writing Hugging Face weights needs the 'safetensors' package; pip install safetensors "
            "(requirements/cpu.txt pins it)"
        ) from None
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}

    def write(shard: Dict[str, torch.Tensor], file: str) -> None:
        atomic_write_path(out_dir / file, lambda tmp: save_file(shard, tmp, metadata=metadata))

    if len(shards) == 1:
        write(shards[0], "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write(shard, file)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(
            out_dir / "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
        )
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def describe_conversion(facts: dict, out_dir: str, hf_dir: str) -> str:
    """The summary the tool prints: the flags to train with, and the layouts the checkpoint loads on."""
    cfg = GPTModelConfig(**model_flag_values(facts["model_flags"]), vocab_size=facts["model"]["vocab_size"])
    sizes = reshardable_tp_sizes(cfg, facts["padded_vocab_size"])
    flags = shlex.join(facts["model_flags"])
    return "\n".join(
        [
            f"wrote {out_dir} ({facts['converted_from']['architecture']}, {facts['converted_from']['dtype']}, "
            f"vocabulary {cfg.vocab_size} padded to {facts['padded_vocab_size']} rows)",
            f"train with: --load {shlex.quote(str(out_dir))} --finetune --tokenizer-type HuggingFaceTokenizer "
            f"--tokenizer-model {shlex.quote(str(hf_dir))} {flags}",
            f"(model flags also in {Path(out_dir) / MODEL_FLAGS_FILE}); it loads on any pipeline and data-parallel "
            f"size, and at --tensor-model-parallel-size {', '.join(map(str, sizes)) or 'none of 1, 2, 4, 8'} (the sizes "
            "whose vocabulary padding matches; convert again with --tensor-model-parallel-size N for another)",
        ]
    )


__all__ = [
    "ARCHITECTURES",
    "HFWeights",
    "fuse_qkv",
    "split_qkv",
    "hf_to_megatron",
    "megatron_to_hf",
    "model_config_from_hf",
    "hf_config_from_model",
    "model_flags",
    "model_flag_values",
    "rope_settings",
    "to_megatron",
    "to_hf",
    "reshardable_tp_sizes",
    "describe_conversion",
    "architecture_for",
    "read_hf_config",
]
