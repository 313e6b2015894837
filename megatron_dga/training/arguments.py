"""Megatron-style command line (and optional YAML file) -> PretrainConfig.

Flags are generated from the config dataclasses, so a field and its flag can never
drift apart: field ``lr_warmup_iters`` of OptimizerConfig is ``--lr-warmup-iters``.
Precedence: dataclass defaults < ``--config FILE.yaml`` < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from typing import Any, Dict, List, Optional, Sequence

from megatron_dga.errors import ConfigError
from megatron_dga.model import GPTModelConfig
from megatron_dga.platform import ParallelConfig
from megatron_dga.training.config import (
    SCHEDULER_RESUME_FLAGS,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MixingConfig,
    OptimizerConfig,
    PretrainConfig,
    ScheduleConfig,
)

SECTIONS = {
    "model": GPTModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "mixing": MixingConfig,
}
# Fields that are derived, not user flags.
_NOT_FLAGS = {
    ("model", "vocab_size"),
    ("mixing", "static_weights"),
    ("parallel", "virtual_pipeline_model_parallel_size"),
}
# Megatron's spelling where it differs from the field name.
_FLAG_NAMES = {
    ("parallel", "backend"): "distributed-backend",
    ("mixing", "strategy"): "mixing",
    **{("optimizer", name): flag[2:] for name, flag in SCHEDULER_RESUME_FLAGS.items()},
}


def _flag(section: str, name: str) -> str:
    return _FLAG_NAMES.get((section, name), name.replace("_", "-"))


def _field_doc(cls, name: str) -> str:
    """The docstring under a dataclass field (the source's string literal after it)."""
    return _field_docs(cls).get(name, "")


@functools.lru_cache(maxsize=None)
def _field_docs(cls) -> Dict[str, str]:
    """Every field docstring of ``cls``; the source is parsed once per class, not once per flag."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        target = getattr(node, "target", None)
        if isinstance(target, ast.Name) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs


def _argparse_kwargs(tp) -> Dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        return _argparse_kwargs(next(a for a in args if a is not type(None)))
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (list, List):
        item = args[0] if args else str
        return {"nargs": "+", "type": item, "metavar": item.__name__.upper()}
    if tp in (int, float, str):
        return {"type": tp, "metavar": tp.__name__.upper()}
    raise TypeError(f"no CLI mapping for {tp!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dga.pretrain_gpt",
        description="Pretrain a megatron-core GPT on a dynamic data mixture (DGA, arXiv 2410.02498).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of flag values; the command line overrides it")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in _NOT_FLAGS:
                continue
            group.add_argument(
                "--" + _flag(section, f.name),
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                help=_field_doc(cls, f.name),
                **_argparse_kwargs(hints[f.name]),
            )
    return parser


def _yaml_key(key) -> str:
    """A YAML key as the flag it names: 'train_iters' and 'train-iters' are both --train-iters."""
    return str(key).replace("_", "-")


def _refuse_repeated_keys(path: str, text: str, flags: Dict[str, str]) -> None:
    """ConfigError naming the file, the flag and the lines when the top-level mapping sets a flag twice.

    YAML loaders keep the last of repeated keys silently; here 'lr' twice, or 'train_iters' and
    'train-iters' (one flag), is an error, as two values for one flag are on a command line of
    another program. Called on text that parses; ``flags`` maps :func:`_yaml_key` names to the flags.
    """
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: Dict[str, List[tuple]] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            seen.setdefault(_yaml_key(key_node.value), []).append((key_node.value, key_node.start_mark.line + 1))
    for flag, uses in seen.items():
        if len(uses) > 1:
            where = ", ".join(f"'{key}' on line {line}" for key, line in uses)
            times = "twice" if len(uses) == 2 else f"{len(uses)} times"
            raise ConfigError(
                f"--config {path}: {flags.get(flag, flag)} is set {times} ({where}); YAML would keep the "
                "last silently; keep one"
            )


def _yaml_values(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8-sig")  # YAML files are UTF-8 (a byte-order mark is allowed)
        raw = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except OSError as exc:  # a directory, no permission
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"--config {path}: not UTF-8 text (byte {data[exc.start : exc.start + 1]!r} at offset "
            f"{exc.start}, line {line}); save the file as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag: value, got {type(raw).__name__}")
    actions = [a for a in parser._actions if a.option_strings and "." in a.dest]
    _refuse_repeated_keys(path, text, {_yaml_key(a.option_strings[0][2:]): a.option_strings[0] for a in actions})
    by_flag = {_yaml_key(a.option_strings[0][2:]): a.dest for a in actions}
    values, unknown = {}, []
    for key, value in raw.items():
        flag = _yaml_key(key)
        if flag not in by_flag:
            unknown.append(key)
        else:
            dest = by_flag[flag]
            section, name = dest.split(".", 1)
            hint = typing.get_type_hints(SECTIONS[section])[name]
            values[dest] = coerce_value(value, hint, f"--config {path}: key '{key}'")
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; use flag names, e.g. 'train-iters: 100'")
    return values


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def coerce_value(value: Any, hint, where: str) -> Any:
    """A YAML value as the field's type, or ConfigError naming ``where``, the value and the type.

    YAML gives strings for quoted values and for numbers like ``1e-3``; Python would take a
    non-empty string as true. Booleans accept true/false/1/0/yes/no (any case) and nothing
    else; integers refuse fractions; every other mismatch is an error, before any dataset,
    model or process group is built.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        return coerce_value(value, next(a for a in args if a is not type(None)), where)
    if origin in (list, List):
        items = value if isinstance(value, list) else [value]
        return [coerce_value(v, args[0] if args else str, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        text = str(value).strip().lower() if not isinstance(value, bool) else ("true" if value else "false")
        if text in _TRUE | _FALSE and not isinstance(value, float):
            return text in _TRUE
        raise ConfigError(f"{where}: {value!r} is not a boolean; use true/false (also 1/0, yes/no)")
    if hint in (int, float):
        accepted = (int, float) if hint is float else int  # an integer flag refuses 2.5 (and 2.0)
        if isinstance(value, accepted) and not isinstance(value, bool):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: {value!r} is not {'an integer' if hint is int else 'a number'}")
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: {value!r} is not a string")
        return str(value)
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> PretrainConfig:
    """Parse the command line (and --config YAML) into validated component configs."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if getattr(ns, "config", None):
        values.update(_yaml_values(ns.config, parser))
    values.update({k: v for k, v in vars(ns).items() if "." in k})
    return config_from_values(values)


def config_from_values(values: Dict[str, Any]) -> PretrainConfig:
    """Build PretrainConfig from {"section.field": value}; unspecified fields keep their defaults."""
    kwargs: Dict[str, Dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        section, name = key.split(".", 1)
        kwargs[section][name] = value
    try:
        return PretrainConfig(**{s: cls(**kwargs[s]) for s, cls in SECTIONS.items()})
    except TypeError as exc:  # a YAML value of the wrong type reaches a dataclass check
        raise ConfigError(f"invalid configuration value: {exc}") from None
