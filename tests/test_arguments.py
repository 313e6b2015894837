"""Megatron-style CLI and YAML -> configs: precedence, types, errors that name the flag."""
import re

import pytest

from megatron_dga.errors import ConfigError
from megatron_dga.training.arguments import build_parser, parse_args

BASE = ["--data-path", "a_text_document"]


def test_yaml_values_are_overridden_by_the_command_line(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("lr: 0.001\ntrain-iters: 7\ntensor_model_parallel_size: 2\nmixing: dga\ndga-ema: 0.5\n")
    cfg = parse_args(BASE + ["--config", str(cfg_file), "--train-iters", "9"])
    assert cfg.optimizer.lr == 0.001
    assert cfg.schedule.train_iters == 9  # CLI wins
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert (cfg.mixing.mixing, cfg.mixing.dga_ema) == ("dga", 0.5)


def test_every_config_field_has_a_documented_flag():
    helps = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    for flag in ("--lr", "--min-lr", "--lr-warmup-iters", "--lr-decay-style", "--weight-decay", "--clip-grad",
                 "--adam-beta1", "--adam-beta2", "--bf16", "--seed", "--tensor-model-parallel-size",
                 "--pipeline-model-parallel-size", "--use-distributed-optimizer", "--data-path",
                 "--specific-data-path", "--specific-eval-data-path", "--tokenizer-type", "--tokenizer-model",
                 "--save", "--load", "--save-interval", "--keep-last", "--eval-interval", "--eval-iters",
                 "--log-interval", "--log-dir", "--tensorboard-dir", "--mixing", "--micro-batch-size",
                 "--global-batch-size", "--train-iters", "--dga-interval", "--dga-eta", "--dga-ema",
                 "--dga-min-weight", "--dga-domain-batch-size", "--dga-specific-batch-size",
                 "--dga-preconditioner", "--dga-basis", "--dga-init", "--dga-estimator"):
        assert helps.get(flag), f"{flag} missing or undocumented"


@pytest.mark.parametrize("argv, message", [
    (["--dga-ema", "0"], "--dga-ema must be in (0, 1]"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--min-lr", "1"], "--min-lr 1.0 must be in [0, --lr"),
    (["--split", "0,5"], "--split must be like"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be a positive integer"),
])
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError) as exc:
        parse_args(BASE + argv)
    assert message in str(exc.value)


def test_unknown_yaml_key_is_reported(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("learning-rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning-rate'\\]"):
        parse_args(BASE + ["--config", str(cfg_file)])


def test_data_path_is_required():
    with pytest.raises(ConfigError, match="--data-path is required"):
        parse_args([])


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--dga-eta", "nan", "--dga-eta must be a finite number >= 0 (the mirror-descent step size), got nan"),
    ("--dga-eta", "-1", "--dga-eta must be a finite number >= 0"),
    ("--exit-duration-in-mins", "0", "--exit-duration-in-mins must be > 0"),
])
def test_numbers_that_cannot_work_are_refused_at_start_up(flag, value, message):
    from megatron_dga.errors import ConfigError
    from megatron_dga.training.arguments import parse_args

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(["--data-path", "x_text_document", flag, value])


@pytest.mark.parametrize("yaml_line, field, expected", [
    ('untie-embeddings-and-output-weights: "false"', ("model", "untie_embeddings_and_output_weights"), False),
    ('use-distributed-optimizer: "no"', ("optimizer", "use_distributed_optimizer"), False),
    ("bf16: YES", ("model", "bf16"), True),
    ("lr: 1e-3", ("optimizer", "lr"), 1e-3),  # PyYAML reads 1e-3 as a string
    ('train-iters: "12"', ("schedule", "train_iters"), 12),
    ("domain-token-limit: 5000", ("data", "domain_token_limit"), [5000]),
])
def test_yaml_values_are_parsed_as_their_types(tmp_path, yaml_line, field, expected):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml_line + "\n")
    cfg = parse_args(BASE + ["--config", str(cfg_file)])
    value = getattr(getattr(cfg, field[0]), field[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("yaml_line, message", [
    ('bf16: "maybe"', r"key 'bf16': 'maybe' is not a boolean; use true/false"),
    ("train-iters: 2.5", r"key 'train-iters': 2.5 is not an integer"),
    ("lr: fast", r"key 'lr': 'fast' is not a number"),
    ("mixing: [dga]", r"key 'mixing': \['dga'\] is not a string"),
])
def test_yaml_values_of_the_wrong_type_name_key_value_and_file(tmp_path, yaml_line, message):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml_line + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {cfg_file}: ") + message):
        parse_args(BASE + ["--config", str(cfg_file)])
