"""Reading a run's config: the recipe's dataclasses (core/config.py) filled from a YAML file and
dotted command-line overrides, each value checked against its field's type, and the resolved
config written back as YAML. Precedence: dataclass default < YAML file < command line.

    python recipes/classification/train.py --config recipes/classification/configs/digits.yaml \
        --optim.lr 3e-4 --loop.epochs 5 --output-dir runs/try1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from core.config import unknown_choice
from core.errors import ConfigError


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, (_, tp) in _fields(cls).items():
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _where(source: str, key: str) -> str:
    """'--loop.epochs' for a flag, 'file.yaml: loop.epochs' for a file."""
    return source if source.replace("-", "_") == f"__{key}" else f"{source}: {key}"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where YAML is ambiguous."""

    def fail(why: str = "") -> ConfigError:
        return ConfigError(f"{_where(source, key)} expects {_type_name(tp)}, got {value!r}{why}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as False
            value = "no"
        if value in args:
            return value
        raise ConfigError(unknown_choice(_where(source, key), value, [str(a) for a in args], "value"))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, str):  # YAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail(" (a list)")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(" (a mapping)")
        return dict(value)
    raise fail(f" (unsupported annotation {tp})")


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    """Write a nested mapping onto a dataclass instance, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    fields = _fields(type(obj))
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            valid = [prefix + f for f in fields]
            raise ConfigError(unknown_choice(source, key, valid, "key"))
        _, tp = fields[name]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, name), value, key + ".", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child)
    if hasattr(obj, "validate"):
        obj.validate()


def load_config(
    cls: type, yaml_path: str | None = None, overrides: list[tuple[str, Any, str]] | None = None, validate: bool = True
):
    """Build `cls` from defaults, then a YAML file, then (key, value, source) overrides; validate
    (unless `validate` is False: a run's config read where its data and files are not)."""
    cfg = cls()
    if yaml_path is not None:
        if not os.path.isfile(yaml_path):
            raise ConfigError(f"--config: file not found: {yaml_path!r}")
        try:
            with open(yaml_path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path}: not valid YAML: {e}") from None
        _apply(cfg, data, "", yaml_path)
    for key, value, source in overrides or []:
        keys = all_keys(cls)
        if key not in keys:
            section = key.rpartition(".")[0]
            siblings = [k for k in keys if k.rpartition(".")[0] == section] or keys
            raise ConfigError(unknown_choice(source, key, siblings, "key"))
        _apply(cfg, _nest(key, value), "", source)
    if validate:
        _validate(cfg)
    return cfg


def _split_overrides(tokens: list[str]) -> list[tuple[str, Any, str]]:
    """`--a.b 3`, `--a.b=3` and a bare `--a.b` (true) into (key, YAML-parsed value, source)."""
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.key VALUE")
        key, eq, raw = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                raw, i = tokens[i + 1], i + 1
            else:
                raw = "true"
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.replace("-", "_"), value, f"--{key}"))
        i += 1
    return out


def describe(cls: type) -> str:
    """Every key with its type, default and help: the text behind `--help`. A key is accepted with
    `-` or `_`; each is shown once, as people type it: top-level keys like the launchers' own flags
    (--output-dir, --eval-only), the others as --section.key_name."""
    lines, default = ["config keys (each set as --key VALUE; a bare --key sets a bool key to true):"], cls()

    def walk(obj: Any, c: type, prefix: str) -> None:
        for name, (f, tp) in _fields(c).items():
            value = getattr(obj, name)
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                lines.append(f"\n{prefix}{name}: {f.metadata.get('help', '')}")
                walk(value, tp, f"{prefix}{name}.")
            else:
                flag = f"{prefix}{name}" if prefix else name.replace("_", "-")
                lines.append(f"  --{flag} ({_type_name(tp)}, default {value!r})\n      {f.metadata.get('help', '')}")

    walk(default, cls, "")
    return "\n".join(lines)


ENTRY_POINT_HELP = (
    "shardvision training entry point: train, evaluate and exit (--eval-only), or read every sample once and "
    "list every problem (--check-data). Any config key can be overridden as --section.key VALUE."
)


def parse_args(cls: type, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """The command line every recipe shares; returns a validated `cls` instance. `prog` and
    `description` title its --help (the `shardvision` subcommands give their own)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or ENTRY_POINT_HELP,
        epilog=describe(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file.")
    parser.add_argument("--resume", help="'auto' or a checkpoint folder (config key checkpoint.resume).")
    parser.add_argument("--weights", help="Local weights file to load (config key model.weights).")
    # The deepspeed launcher passes --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)

    overrides = _split_overrides(rest)  # --output-dir and --eval-only among them: top-level keys
    for flag, key in (("resume", "checkpoint.resume"), ("weights", "model.weights")):
        if getattr(args, flag) is not None:
            overrides.append((key, getattr(args, flag), f"--{flag}"))
    return load_config(cls, args.config, overrides)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}: how trackers and reports name keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_config(cfg: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
