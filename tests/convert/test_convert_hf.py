"""tools/convert_hf_checkpoint.py: Hugging Face <-> torch_dist checkpoints (megatron_dga.convert.hf).

Tiny random-weight models built here from configs (no download): Llama with grouped-query
attention and untied embeddings, Llama with multi-query attention, tied embeddings, a head width
other than hidden/heads and Llama 3 RoPE scaling, Qwen2 (q/k/v biases, a tokenizer smaller than
the embedding), Mistral (a sliding window longer than the sequence) and GPT-2 (Conv1D, learned
positions, tanh GELU). Each is converted with the tool,
loaded into megatron-core's GPTModel through our checkpoint code, and its logits compared with
Hugging Face's on the same tokens (fp32: equal to rounding, measured at most 1.4e-6 of the largest logit, ~7);
converted back, every tensor is bit-identical to the original. The Llama checkpoint also loads at
TP=2 (same logits) and PP=2 (same weights per stage).
"""

import importlib.util
import json
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO
from tests.helpers.dist_utils import run_distributed

# Imported lazily (`_transformers()`): the gloo ranks spawned below import this module too, and need no transformers.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers is not installed (requirements/cpu.txt pins it); the converter's tests build Hugging Face "
    "models",
)


def _transformers():
    import transformers

    return transformers


TOOL = str(Path(REPO) / "tools" / "convert_hf_checkpoint.py")
SEQ, BATCH = 24, 2
DIVISIBLE = ["--make-vocab-size-divisible-by", "64"]  # vocab 100 pads to 128 at TP=1 and TP=2 alike

LLAMA = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
CASES = {
    # name: (config class, config kwargs, tokenizer tokens or None, convert back with --hf-reference)
    "llama-gqa": (
        "LlamaConfig",
        dict(
            LLAMA,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        None,
        True,
    ),
    "llama-mqa-tied-rope-scaling": (
        "LlamaConfig",
        dict(
            LLAMA,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
        None,
        False,
    ),
    "qwen2-bias": (
        "Qwen2Config",
        dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=False),
        90,
        True,
    ),
    # Mistral's 4096-token sliding window is longer than the sequence: it changes nothing, so it converts.
    "mistral-window": ("MistralConfig", dict(LLAMA, num_key_value_heads=2, sliding_window=4096), None, True),
    "gpt2": ("GPT2Config", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64), 100, False),
}


def _write_tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def _build_hf(directory: Path, config_cls: str, kwargs: dict, tokens: int | None):
    torch.manual_seed(0)
    transformers = _transformers()
    config = getattr(transformers, config_cls)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random weights everywhere (Hugging Face initialises biases to 0 and norms to 1)
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.1 if "norm" in name or "ln_" in name else 0.3)
                + (1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0)
            )
    model.save_pretrained(directory)
    if tokens:
        _write_tokenizer(directory, tokens)
    return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(BATCH, SEQ))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (cls, kwargs, tokens, _) in CASES.items():
        model = _build_hf(root / name, cls, kwargs, tokens)
        ids = _tokens(tokens or kwargs["vocab_size"])
        out[name] = {"dir": str(root / name), "ids": ids, "logits": _hf_logits(model, ids), "model": model}
    return out


TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _megatron_logits(ckpt_dir: str, ids: np.ndarray, flags: list) -> np.ndarray:
    """Load ``ckpt_dir`` (model only, as --finetune will) into a GPTModel built from the written flags."""
    from megatron.core import parallel_state

    from megatron_dga import platform
    from megatron_dga.convert.hf import model_flag_values
    from megatron_dga.model import GPTModelConfig, build_gpt_model, causal_attention_mask
    from megatron_dga.training import checkpoint as ckpt

    path, meta = ckpt.resolve_checkpoint(ckpt_dir)
    cfg = GPTModelConfig(vocab_size=meta["extra"]["model"]["vocab_size"], **model_flag_values(flags))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    with platform.megatron_cuda_calls_on_cpu():
        model = build_gpt_model(
            cfg,
            tp,
            pp,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    state = ckpt.load_distributed_checkpoint(path, meta, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"])
    if pp > 1:
        return model
    tokens = torch.from_numpy(ids)
    with torch.no_grad(), platform.megatron_cuda_calls_on_cpu():
        logits = model.eval()(tokens, torch.arange(SEQ).expand_as(tokens), causal_attention_mask(SEQ, "cpu"))
    if tp > 1:  # vocabulary-parallel logits: gather the slices
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits.numpy()


def _convert_all(cases, root):
    """Each case through the tool there and back, and its logits in megatron (one process, as the tool runs)."""
    from megatron_dga import platform

    main = runpy.run_path(TOOL)["main"]
    results = {}
    for name, (hf_dir, ids, back_with_reference) in cases.items():
        conv, back = os.path.join(root, name), os.path.join(root, name + "-hf")
        assert (
            main(
                [
                    "to-megatron",
                    "--hf-dir",
                    hf_dir,
                    "--output",
                    conv,
                    "--seq-length",
                    str(SEQ),
                    "--tensor-model-parallel-size",
                    "2",
                    *DIVISIBLE,
                ]
            )
            == 0
        )
        flags = Path(conv, "model_flags.txt").read_text().split()
        platform.initialize(platform.ParallelConfig())
        logits = _megatron_logits(conv, ids, flags)
        platform.shutdown()
        if back_with_reference:  # config.json and tokenizer from the original directory
            source = ["--hf-reference", hf_dir]
        else:  # config.json from the model flags alone
            source = flags + (["--tokenizer-model", hf_dir] if Path(hf_dir, "tokenizer.json").exists() else [])
        assert main(["to-hf", "--load", conv, "--output", back, *source]) == 0
        results[name] = {"logits": logits, "flags": flags, "back": back, "ckpt": conv}
    # bf16 storage (what --dtype auto picks for a bf16 model), loaded into an fp32 model.
    hf_dir, ids, _ = cases["llama-gqa"]
    bf16 = os.path.join(root, "llama-gqa-bf16")
    assert (
        main(
            [
                "to-megatron",
                "--hf-dir",
                hf_dir,
                "--output",
                bf16,
                "--seq-length",
                str(SEQ),
                "--dtype",
                "bf16",
                *DIVISIBLE,
            ]
        )
        == 0
    )
    platform.initialize(platform.ParallelConfig())
    results["llama-gqa"]["bf16_logits"] = _megatron_logits(bf16, ids, results["llama-gqa"]["flags"])
    platform.shutdown()
    # Errors: one line, exit 2, nothing written.
    results["errors"] = {
        "not-empty": main(["to-megatron", "--hf-dir", cases["gpt2"][0], "--output", os.path.join(root, "gpt2")]),
        "no-model": main(["to-hf", "--load", os.path.join(root, "gpt2"), "--output", os.path.join(root, "x")]),
        "wrong-flags": main(
            [
                "to-hf",
                "--load",
                os.path.join(root, "gpt2"),
                "--output",
                os.path.join(root, "y"),
                *results["gpt2"]["flags"],
                "--hidden-size",
                "64",
            ]
        ),
    }
    return results


def _all_checks(rank, world_size, cases, root):
    """Rank 0 converts every case as a plain single process (its own private process group) while rank 1
    waits; then both load the Llama conversion at TP=2 and PP=2. One spawn of two ranks for the module."""
    converted = None
    if rank == 0:
        torchrun = {key: os.environ.pop(key) for key in TORCHRUN_ENV if key in os.environ}
        converted = _convert_all(cases, root)
        os.environ.update(torchrun)
    ckpt_dir = os.path.join(root, "llama-gqa")  # rank 1 reads it once rank 0 joins the process group below
    return converted, _other_layouts(ckpt_dir, cases["llama-gqa"][1])


@pytest.fixture(scope="module")
def checks(hf_models, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("converted"))
    cases = {name: (m["dir"], m["ids"], CASES[name][3]) for name, m in hf_models.items()}
    return run_distributed(_all_checks, world_size=2, args=(cases, root))


@pytest.fixture(scope="module")
def converted(checks):
    return checks[0][0]


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_logits_equal_hugging_face(hf_models, converted, name):
    want = hf_models[name]["logits"]
    got = converted[name]["logits"]
    vocab = want.shape[-1]
    assert got.shape[-1] >= vocab  # padded vocabulary: compare the model's rows
    scale = float(np.abs(want).max())
    assert scale > 1.0  # logits of a size where a wrong layout could not hide
    np.testing.assert_allclose(got[..., :vocab], want, rtol=0, atol=1e-5 * scale)


def test_bf16_checkpoint_logits_within_bf16_rounding(hf_models, converted):
    want = hf_models["llama-gqa"]["logits"]
    got = converted["llama-gqa"]["bf16_logits"][..., : want.shape[-1]]
    scale = float(np.abs(want).max())
    err = np.abs(got - want)
    # bf16 keeps 8 significant bits of each weight: ~1% per logit on average through two random layers (a wrong
    # layout is off by the logits' own size); measured mean 0.2%, max 2% of the largest logit.
    assert err.mean() < 1e-2 * scale and err.max() < 0.1 * scale, (err.mean() / scale, err.max() / scale)
    assert err.max() > 1e-5 * scale  # the weights really were rounded


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical(hf_models, converted, name):
    original = hf_models[name]["model"]
    back = _transformers().AutoModelForCausalLM.from_pretrained(converted[name]["back"]).eval()
    want, got = original.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    for field in (
        "vocab_size",
        "tie_word_embeddings",
        "num_hidden_layers",
        "n_layer",
        "num_key_value_heads",
        "head_dim",
        "activation_function",
        "rope_parameters",
        "attention_bias",
        "mlp_bias",
    ):
        assert getattr(back.config, field, None) == getattr(original.config, field, None), field
    np.testing.assert_array_equal(_hf_logits(back, hf_models[name]["ids"]), hf_models[name]["logits"])


def test_checkpoint_facts_and_flags(converted):
    from megatron_dga.training.checkpoint import resolve_checkpoint

    _, meta = resolve_checkpoint(converted["qwen2-bias"]["ckpt"])
    extra = meta["extra"]
    assert extra["contents"] == ["model"] and meta["iteration"] == 0 and meta["ckpt_format"] == "torch_dist"
    # The trainer's vocabulary is the tokenizer's (90); the embedding keeps the model's 100 rows in 128.
    assert extra["model"]["vocab_size"] == 90 and extra["padded_vocab_size"] == 128
    assert extra["converted_from"]["vocab_size"] == 100
    assert {"--disable-bias-linear", "--add-qkv-bias", "--swiglu", "--group-query-attention"} <= set(
        converted["qwen2-bias"]["flags"]
    )
    assert "--openai-gelu" in converted["gpt2"]["flags"]
    llama = converted["llama-mqa-tied-rope-scaling"]["flags"]
    assert llama[llama.index("--kv-channels") + 1] == "16" and "--use-rope-scaling" in llama
    assert "--untie-embeddings-and-output-weights" not in llama
    assert converted["errors"] == {"not-empty": 2, "no-model": 2, "wrong-flags": 2}


def _other_layouts(ckpt_dir, ids):
    from megatron_dga import platform
    from megatron_dga.model import global_parameter_names

    platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=2))
    flags = Path(ckpt_dir, "model_flags.txt").read_text().split()
    tp2 = _megatron_logits(ckpt_dir, ids, flags)
    platform.initialize(platform.ParallelConfig(pipeline_model_parallel_size=2))
    stage = _megatron_logits(ckpt_dir, ids, flags)
    weights = {name: p.detach().numpy().copy() for name, p in global_parameter_names(stage).items()}
    platform.shutdown()
    return tp2, weights


def test_loads_on_other_layouts(hf_models, converted, checks):
    """The converted checkpoint reshards: TP=2 gives the same logits, PP=2 stages hold the same weights."""
    from megatron_dga.convert.hf import HFWeights, hf_to_megatron, model_flag_values
    from megatron_dga.model import GPTModelConfig

    hf = hf_models["llama-gqa"]
    vocab, scale = hf["logits"].shape[-1], float(np.abs(hf["logits"]).max())
    for _, (tp2, _) in checks:
        np.testing.assert_allclose(tp2[..., :vocab], hf["logits"], rtol=0, atol=1e-5 * scale)
    # PP=2: stage 0 holds the embedding and layer 0, stage 1 layer 1, the norm and the output layer.
    cfg = GPTModelConfig(vocab_size=vocab, **model_flag_values(converted["llama-gqa"]["flags"]))
    weights = HFWeights(hf["dir"])
    expected = {n: t.numpy() for n, t in hf_to_megatron(cfg, "llama", weights.names(), weights.get, 128)}
    stages = [stage for _, (_, stage) in checks]
    assert sorted(stages[0]) == sorted(n for n in expected if n.startswith(("embedding.", "decoder.layers.0.")))
    assert sorted(stages[1]) == sorted(n for n in expected if not n.startswith(("embedding.", "decoder.layers.0.")))
    for stage in stages:
        for name, value in stage.items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_hf_weights_read_sharded_safetensors_bin_and_unprefixed_gpt2(hf_models, tmp_path):
    """Hugging Face's other layouts: an index over several safetensors files, pytorch_model.bin, and the
    original GPT-2 names without the ``transformer.`` prefix; all give the same megatron tensors."""
    from safetensors.torch import save_file

    from megatron_dga.convert.hf import HFWeights, hf_to_megatron, model_config_from_hf, read_hf_config

    source = HFWeights(hf_models["gpt2"]["dir"])
    tensors = {n: source.get(n) for n in sorted(source.names())}
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    sharded.mkdir(), binary.mkdir()
    names = sorted(tensors)
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in parts.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: f for f, part in parts.items() for n in part}})
    )
    torch.save({n.removeprefix("transformer."): t for n, t in tensors.items()}, binary / "pytorch_model.bin")

    cfg = model_config_from_hf(read_hf_config(hf_models["gpt2"]["dir"]), "config.json")

    def mapped(weights):
        return dict(hf_to_megatron(cfg, "gpt2", weights.names(), weights.get, 128))

    want = mapped(source)
    for directory in (sharded, binary):
        got = mapped(HFWeights(directory))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want)


# ----------------------------------------------------------------------------- pure mapping checks (no process group)


def test_fused_qkv_layout_groups_queries_with_their_keys_and_values():
    from megatron_dga.convert.hf import fuse_qkv, split_qkv

    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).reshape(heads * d, 1).float()
    k = 100 + torch.arange(groups * d).reshape(groups * d, 1).float()
    v = 200 + torch.arange(groups * d).reshape(groups * d, 1).float()
    fused = fuse_qkv(q, k, v, heads, groups).flatten().tolist()
    # group 0: q heads 0-1, k_0, v_0; group 1: q heads 2-3, k_1, v_1
    assert fused == [*range(0, 6), 100, 101, 102, 200, 201, 202, *range(6, 12), 103, 104, 105, 203, 204, 205]
    for h, g in ((4, 2), (4, 4), (8, 1)):
        q, k, v = torch.randn(h * d, 5), torch.randn(g * d, 5), torch.randn(g * d, 5)
        for got, want in zip(split_qkv(fuse_qkv(q, k, v, h, g), h, g), (q, k, v)):
            assert torch.equal(got, want)


def test_rope_settings_read_both_config_formats():
    from megatron_dga.convert.hf import rope_settings

    scaling = {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    want = {"rotary_base": 500000, "use_rope_scaling": True, "rope_scaling_factor": 32.0}
    assert rope_settings(old, "c") == rope_settings(new, "c") == want
    assert rope_settings({}, "c") == {"rotary_base": 10000}


REFUSED = {
    "architecture": ({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, "FalconForCausalLM"),
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    "llama3-other-frequencies": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
        "low_freq_factor is 2.0",
    ),
    "attention-bias-only": ({"attention_bias": True}, "attention_bias True with mlp_bias False"),
    "activation": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "fractional-theta": ({"rope_theta": 10000.5}, "rope_theta 10000.5"),
    "mistral-window": (
        {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
        "sliding_window 16 is shorter than --seq-length 64",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_cannot_be_mapped_is_an_error_naming_the_field(case):
    from megatron_dga.convert.hf import model_config_from_hf
    from megatron_dga.errors import ConfigError

    overrides, message = REFUSED[case]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA, **overrides}
    with pytest.raises(ConfigError, match="config.json") as err:
        model_config_from_hf(config, "hf/config.json")
    assert message in str(err.value)


def test_gpt2_refuses_other_activations_and_attention_scalings():
    from megatron_dga.convert.hf import model_config_from_hf
    from megatron_dga.errors import ConfigError

    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **CASES["gpt2"][1]}
    assert model_config_from_hf(gpt2, "c").openai_gelu
    with pytest.raises(ConfigError, match="activation_function 'relu'"):
        model_config_from_hf({**gpt2, "activation_function": "relu"}, "c")
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        model_config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True}, "c")


@pytest.mark.parametrize("name", list(CASES))
def test_model_flags_rebuild_the_config(name):
    from megatron_dga.convert.hf import model_config_from_hf, model_flag_values, model_flags
    from megatron_dga.model import GPTModelConfig

    cls, kwargs, _, _ = CASES[name]
    hf = json.loads(getattr(_transformers(), cls)(**kwargs).to_json_string())
    hf["architectures"] = [cls.replace("Config", "ForCausalLM").replace("GPT2ForCausalLM", "GPT2LMHeadModel")]
    cfg = model_config_from_hf(hf, "config.json", seq_length=SEQ)
    assert GPTModelConfig(vocab_size=cfg.vocab_size, **model_flag_values(model_flags(cfg))) == cfg


def test_converted_model_finetunes_with_dga_and_refuses_a_plain_resume(converted, tmp_path):
    """The README's path: --load CONVERTED --finetune --mixing dga trains from the converted weights."""
    from megatron_dga.data import mock
    from tests.helpers.dist_utils import run_pretrain

    ckpt, flags = converted["llama-gqa"]["ckpt"], converted["llama-gqa"]["flags"]
    shards = mock.write_domains(
        str(tmp_path / "shards"),
        vocab_size=100,
        eod=99,
        k=2,
        docs_per_domain=24,
        doc_len=64,
        specific_mixture=[1.0, 0.0],
        specific_docs=16,
    )
    argv = [
        "--data-path",
        *shards["domains"],
        "--specific-data-path",
        shards["specific"],
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "99",
        *flags,
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--split",
        "80,20",
        "--mixing",
        "dga",
        "--dga-interval",
        "1",
        "--dga-specific-batch-size",
        "4",
        "--dga-domain-batch-size",
        "2",
        "--log-dir",
        str(tmp_path / "log"),
        "--load",
        ckpt,
    ]
    rcs, metrics = run_pretrain(argv + ["--finetune"])
    assert rcs == [0] and [m["iteration"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["lm_loss"]) for m in metrics) and metrics[-1].get("dga_update")
    # Without --finetune there is nothing to resume but the weights: one clear error before any load.
    from megatron_dga.errors import ConfigError
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.resume import load_job

    class _Trainer:
        cfg = parse_args(argv)

    with pytest.raises(ConfigError, match="holds model weights only .*add --finetune"):
        load_job(_Trainer(), ckpt)
