"""Megatron-style CLI and YAML -> configs: precedence, types, errors that name the flag."""

import argparse
import dataclasses
import re

import pytest
import torch

from megatron_dga.errors import ConfigError
from megatron_dga.training.arguments import _NOT_FLAGS, SECTIONS, _flag, build_parser, parse_args

BASE = ["--data-path", "a_text_document"]


def test_yaml_values_are_overridden_by_the_command_line(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("lr: 0.001\ntrain-iters: 7\ntensor_model_parallel_size: 2\nmixing: dga\ndga-ema: 0.5\n")
    cfg = parse_args(BASE + ["--config", str(cfg_file), "--train-iters", "9"])
    assert cfg.optimizer.lr == 0.001
    assert cfg.schedule.train_iters == 9  # CLI wins
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.mixing.strategy, cfg.mixing.dga_ema) == ("dga", 0.5)


def _flag_actions():
    """Every flag of the trainer's parser but --help and --config, walked from the parser itself."""
    return [a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "config")]


def test_every_flag_is_a_documented_config_field_and_every_field_has_its_flag():
    actions = _flag_actions()
    by_dest = {a.dest: a for a in actions}
    assert len(by_dest) == len(actions) > 100
    fields = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(by_dest) == fields - {f"{section}.{name}" for section, name in _NOT_FLAGS}
    for a in actions:
        assert a.option_strings[0] == "--" + _flag(*a.dest.split(".", 1)), a.option_strings
        assert a.help and len(a.help.split()) >= 3, f"{a.option_strings[0]} has no help"
    # Megatron-LM's spellings where they differ from the field names
    flags = {a.option_strings[0] for a in actions}
    assert {"--distributed-backend", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"} <= flags


def _example_values(action):
    """Command-line values of a flag's type and what the parser must make of them."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [([action.option_strings[0]], True), ([action.option_strings[1]], False)]
    if action.choices:
        return [([str(c)], c) for c in action.choices]
    kind = action.type or str
    one = {int: ("3", 3), float: ("0.25", 0.25), str: ("some_value", "some_value")}[kind]
    if action.nargs == "+":
        return [([one[0], one[0]], [one[1], one[1]])]
    return [([one[0]], one[1])]


@pytest.mark.parametrize("action", _flag_actions(), ids=lambda a: a.option_strings[0])
def test_every_flag_parses_a_value_of_its_type_into_its_field(action):
    for values, expected in _example_values(action):
        argv = values if values[0].startswith("--") else [action.option_strings[0], *values]
        parsed = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "config"}
        assert parsed == {action.dest: expected}, (argv, parsed)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dga-ema", "0"], "--dga-ema must be in (0, 1]"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--min-lr", "1"], "--min-lr 1.0 must be in [0, --lr"),
        (["--split", "0,5"], "--split must be like"),
        (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be a positive integer"),
    ],
)
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as exc:
        parse_args(BASE + argv)
    assert message in str(exc.value)


def test_unknown_yaml_key_is_reported(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("learning-rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning-rate'\\]"):
        parse_args(BASE + ["--config", str(cfg_file)])


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: 0.001\ntrain-iters: 7\nlr: 0.002\n", "--lr is set twice ('lr' on line 1, 'lr' on line 3)"),
        (
            "train_iters: 7\nmixing: dga\ntrain-iters: 9\n",
            "--train-iters is set twice ('train_iters' on line 1, 'train-iters' on line 3)",
        ),
    ],
)
def test_yaml_key_given_twice_is_refused_naming_file_key_and_lines(tmp_path, text, message):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError) as exc:
        parse_args(BASE + ["--config", str(cfg_file)])
    assert str(exc.value).startswith(f"--config {cfg_file}: {message}"), str(exc.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--override-opt_param-scheduler"], "--override-opt_param-scheduler given without --load"),
        (
            ["--load", "c", "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"],
            "contradict each other; keep one",
        ),
        (
            ["--load", "c", "--use-checkpoint-opt_param-scheduler", "--no-load-optim"],
            "--use-checkpoint-opt_param-scheduler with --no-load-optim, which starts a fresh LR schedule",
        ),
    ],
)
def test_scheduler_resume_flags_that_cannot_act_are_refused(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(BASE + argv)


def test_scheduler_resume_flags_keep_megatrons_spelling_and_read_from_yaml(tmp_path):
    opt = parse_args(BASE + ["--load", "c", "--override-opt_param-scheduler"]).optimizer
    assert opt.override_opt_param_scheduler and not opt.use_checkpoint_opt_param_scheduler
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("load: c\nuse_checkpoint_opt_param_scheduler: true\n")
    assert parse_args(BASE + ["--config", str(cfg_file)]).optimizer.use_checkpoint_opt_param_scheduler


def test_data_path_is_required():
    with pytest.raises(ConfigError, match="--data-path is required"):
        parse_args([])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--dga-eta", "nan", "--dga-eta must be a finite number >= 0 (the mirror-descent step size), got nan"),
        ("--dga-eta", "-1", "--dga-eta must be a finite number >= 0"),
        ("--exit-duration-in-mins", "0", "--exit-duration-in-mins must be > 0"),
    ],
)
def test_numbers_that_cannot_work_are_refused_at_start_up(flag, value, message):
    from megatron_dga.errors import ConfigError
    from megatron_dga.training.arguments import parse_args

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--data-path", "x_text_document", flag, value])


@pytest.mark.parametrize(
    "yaml_line, field, expected",
    [
        ('untie-embeddings-and-output-weights: "false"', ("model", "untie_embeddings_and_output_weights"), False),
        ('use-distributed-optimizer: "no"', ("optimizer", "use_distributed_optimizer"), False),
        ("bf16: YES", ("model", "bf16"), True),
        ("lr: 1e-3", ("optimizer", "lr"), 1e-3),  # PyYAML reads 1e-3 as a string
        ('train-iters: "12"', ("schedule", "train_iters"), 12),
        ("domain-token-limit: 5000", ("data", "domain_token_limit"), [5000]),
    ],
)
def test_yaml_values_are_parsed_as_their_types(tmp_path, yaml_line, field, expected):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml_line + "\n")
    cfg = parse_args(BASE + ["--config", str(cfg_file)])
    value = getattr(getattr(cfg, field[0]), field[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "yaml_line, message",
    [
        ('bf16: "maybe"', r"key 'bf16': 'maybe' is not a boolean; use true/false"),
        ("train-iters: 2.5", r"key 'train-iters': 2.5 is not an integer"),
        ("lr: fast", r"key 'lr': 'fast' is not a number"),
        ("mixing: [dga]", r"key 'mixing': \['dga'\] is not a string"),
    ],
)
def test_yaml_values_of_the_wrong_type_name_key_value_and_file(tmp_path, yaml_line, message):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml_line + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {cfg_file}: ") + message):
        parse_args(BASE + ["--config", str(cfg_file)])


# ----------------------------------------------------------------------------- Llama-style models, memory flags

LLAMA = [
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--swiglu",
    "--disable-bias-linear",
    "--normalization",
    "RMSNorm",
    "--position-embedding-type",
    "rope",
    "--rotary-base",
    "500000",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
]


def test_llama_style_flags_map_onto_megatron_core():
    """Megatron-LM's meanings: --swiglu is a SiLU gated linear unit with the 8h/3 MLP width rounded
    down to 64, --disable-bias-linear is add_bias_linear=False (and no QKV bias), and
    --recompute-activations is selective recomputation."""
    from megatron_dga.model import build_transformer_config, rope_arguments

    cfg = dataclasses.replace(parse_args(BASE + LLAMA + ["--recompute-activations"]).model, vocab_size=128)
    config = build_transformer_config(cfg, 2, 1)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 16, 128)
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert (config.add_bias_linear, config.add_qkv_bias, config.normalization) == (False, False, "RMSNorm")
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "selective",
        None,
        None,
    )
    assert rope_arguments(cfg) == dict(
        rotary_base=500000, rotary_percent=1.0, rope_scaling=False, rope_scaling_factor=8.0
    )
    full = parse_args(
        BASE
        + LLAMA
        + [
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "block",
            "--recompute-num-layers",
            "1",
            "--add-qkv-bias",
            "--kv-channels",
            "32",
        ]
    ).model
    full = dataclasses.replace(full, vocab_size=128)
    config = build_transformer_config(full, 1, 1)
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 1)
    assert (config.add_bias_linear, config.add_qkv_bias, config.kv_channels) == (False, True, 32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-query-groups", "2"], "--num-query-groups 2 given without --group-query-attention"),
        (
            ["--group-query-attention", "--num-query-groups", "3"],
            "--num-query-groups 3 does not divide --num-attention-heads",
        ),
        (["--rotary-base", "500000"], "--rotary-base 500000 acts with --position-embedding-type rope only"),
        (
            ["--position-embedding-type", "rope", "--rope-scaling-factor", "4"],
            "--rope-scaling-factor 4.0 acts with --use-rope-scaling only",
        ),
        (
            ["--position-embedding-type", "rope", "--rotary-percent", "1.5"],
            "--rotary-percent must be in (0, 1], got 1.5",
        ),
        (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method"),
        (["--recompute-method", "uniform"], "--recompute-method uniform acts with --recompute-granularity full only"),
        (
            ["--recompute-activations", "--recompute-num-layers", "1"],
            "--recompute-num-layers 1 acts with --recompute-granularity full only (--recompute-granularity selective",
        ),
        (
            [
                "--recompute-activations",
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "1",
            ],
            "--recompute-activations means --recompute-granularity selective",
        ),
        (["--use-flash-attn", "--attention-backend", "fused"], "--use-flash-attn selects --attention-backend flash"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 both given"),
        (["--loss-scale", "1024"], "--loss-scale 1024.0 given without --fp16"),
        (
            ["--loss-scale", "1024", "--hysteresis", "4"],
            "--hysteresis 4 tunes dynamic loss scaling, which --loss-scale",
        ),
        (
            ["--fp16", "--mixing", "dga", "--dga-estimator", "fd"],
            "--dga-estimator fd with --fp16: the finite-difference step is rounded away in 16-bit parameters",
        ),
        (
            ["--overlap-param-gather", "--overlap-grad-reduce"],
            "--overlap-param-gather overlaps the distributed optimizer's parameter all-gather, and "
            "--use-distributed-optimizer is not given",
        ),
        (
            ["--overlap-param-gather", "--use-distributed-optimizer"],
            "--overlap-param-gather needs --overlap-grad-reduce",
        ),
        (
            ["--ddp-bucket-size", "1000000"],
            "--ddp-bucket-size 1000000 given without --overlap-grad-reduce: megatron-core "
            "reduces each grad buffer as one bucket; add --overlap-grad-reduce or drop it",
        ),
        (["--overlap-grad-reduce", "--ddp-bucket-size", "0"], "--ddp-bucket-size must be > 0"),
        (
            ["--wandb-exp-name", "x", "--wandb-save-dir", "d"],
            "--wandb-exp-name x, --wandb-save-dir d given without --wandb-project: nothing is sent to W&B",
        ),
        (["--swiglu", "--hidden-size", "16"], "--swiglu without --ffn-hidden-size gives Megatron's MLP width"),
    ],
)
def test_architecture_and_memory_flags_that_would_be_ignored_or_cannot_work(argv, message):
    with pytest.raises(ConfigError) as exc:
        parse_args(BASE + argv)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "argv",
    [["--use-flash-attn"], ["--attention-backend", "flash"], ["--attention-backend", "fused"]],
    ids=lambda a: " ".join(a),
)
def test_flash_and_fused_attention_need_16_bit_precision_on_any_machine(argv):
    """transformer-engine has no fp32 flash/fused attention: refused at start-up, not at the first forward."""
    with pytest.raises(ConfigError, match="needs --bf16 or --fp16: transformer-engine's flash and fused attention"):
        parse_args(BASE + argv)
    for precision in (["--bf16"], ["--fp16"]):  # then only the machine can refuse it (no CUDA GPU here)
        with pytest.raises(ConfigError, match="needs a CUDA GPU" if not torch.cuda.is_available() else "$^"):
            parse_args(BASE + argv + precision)


CPU_REFUSED = [
    (
        ["--use-flash-attn", "--bf16"],
        "--use-flash-attn selects a transformer-engine attention kernel, which needs a "
        "CUDA GPU with transformer-engine; this machine has no CUDA GPU",
    ),
    (
        ["--attention-backend", "fused", "--bf16"],
        "--attention-backend fused selects a transformer-engine attention kernel",
    ),
    (
        ["--context-parallel-size", "2"],
        "--context-parallel-size 2 needs Transformer Engine's attention (megatron-core's local DotProductAttention "
        "supports only 1), and this machine has no CUDA GPU; besides, this trainer does not split sequences over "
        "context-parallel ranks yet",
    ),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="these flags run where CUDA (and transformer-engine) is")
@pytest.mark.parametrize(
    "argv, message", CPU_REFUSED, ids=["use-flash-attn", "attention-backend", "context-parallel-size"]
)
def test_flags_this_machine_cannot_run_exit_2_with_one_line(capsys, argv, message):
    from megatron_dga.pretrain_gpt import main

    assert main(BASE + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err


@pytest.mark.parametrize(
    "change, flag",
    [
        (["--num-query-groups", "4"], "--num-query-groups"),
        (["--no-swiglu"], "--swiglu"),
        (["--no-disable-bias-linear"], "--disable-bias-linear"),
        (["--kv-channels", "32"], "--kv-channels"),
        (["--add-qkv-bias"], "--add-qkv-bias"),
    ],
)
def test_resume_with_another_model_shape_names_the_flag(change, flag):
    from types import SimpleNamespace

    from megatron_dga.training import resume

    def trainer(extra):
        return SimpleNamespace(
            cfg=parse_args(BASE + LLAMA + extra), data=SimpleNamespace(domain_info=SimpleNamespace(names=["a"]))
        )

    saved = resume.job_facts(trainer([]))
    resume.check_resumable(saved, trainer(["--rotary-base", "1000000"]), "at iteration 10")  # not a shape
    with pytest.raises(ConfigError, match=f"^{re.escape(flag)}: the checkpoint at iteration 10 was trained with"):
        resume.check_resumable(saved, trainer(change), "at iteration 10")


def test_fd_estimator_with_transformer_engine_layers_is_refused(monkeypatch):
    """transformer-engine runs fp32 GEMMs in TF32: fd's finite differences would drown in its rounding."""
    from megatron_dga import model as model_mod

    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(model_mod.GPTModelConfig, "check_machine", lambda self, te: None)
    fd = ["--mixing", "dga", "--specific-data-path", "s", "--dga-estimator", "fd"]
    with pytest.raises(ConfigError, match="--dga-estimator fd with transformer-engine layers: they compute fp32 GEMMs"):
        parse_args(BASE + fd)
    parse_args(BASE + fd + ["--attention-backend", "local"])  # megatron-core's local layers: true fp32
    parse_args(BASE + ["--mixing", "dga", "--specific-data-path", "s"])  # the exact estimator


def test_a_gpu_forward_passes_no_attention_mask():
    """On a GPU the attention applies its causal mask type itself (no s x s tensor); on CPU megatron-core
    needs the explicit mask, built once per length."""
    from megatron_dga.training.step import attention_mask

    assert attention_mask(32768, torch.device("cuda", 0)) is None and attention_mask(8, "cuda") is None
    mask = attention_mask(8, "cpu")
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool and bool(mask[0, 0, 0, 1]) and not mask[0, 0, 1, 0]
    assert attention_mask(8, "cpu") is mask


def test_the_parsed_config_is_read_only_and_a_changed_copy_is_validated_again():
    cfg = parse_args(
        [
            "--mock-data",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "127",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "32",
            "--train-iters",
            "4",
        ]
    )
    for section, field, value in (
        ("model", "vocab_size", 128),
        ("optimizer", "lr", 1.0),
        ("mixing", "mixing", "dga"),
        ("data", "data_path", ["x"]),
        ("parallel", "tensor_model_parallel_size", 2),
    ):
        with pytest.raises(AttributeError, match=rf"\.{field}: the job config is read-only once parsed"):
            setattr(getattr(cfg, section), field, value)
    with pytest.raises(AttributeError, match="read-only"):
        cfg.model = None
    cfg.optimizer.lr = cfg.optimizer.lr  # the same value: what re-validating a copy does
    copy = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=128))
    assert copy.model.vocab_size == 128 and cfg.model.vocab_size == 0
    with pytest.raises(AttributeError):
        copy.model.vocab_size = 1  # the copy is read-only too
    with pytest.raises(ConfigError, match="--hidden-size 32 is not divisible by --num-attention-heads 3"):
        dataclasses.replace(cfg.model, num_attention_heads=3)
