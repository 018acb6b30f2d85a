"""Typed dataclasses from plain mappings: unknown keys, wrong types and non-finite numbers are
ConfigErrors naming the key and where it was written. Knows nothing of the pipeline's own
config; pipeline/config.py declares that shape.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any, Literal

import yaml

from pipeline.yamlfile import ConfigError


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type, raw: Any, prefix: str, where, default: Any = None) -> Any:
    """Turn a mapping into dataclass `cls`, rejecting unknown keys and wrong types.

    Keys the mapping leaves out keep `default`'s values: the parent field's own default, so
    `mlm_pretrain: {num_cpus: 1}` stays disabled like the section it partly overrides."""
    label = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(prefix.rstrip('.'))}: {label}: expected a mapping, got {raw!r}")
    types_ = field_types(cls)
    for key in raw:
        if key not in types_:
            raise ConfigError(f"{where(prefix + str(key))}: unknown key '{prefix}{key}'" + did_you_mean(str(key), types_))
    obj = copy.deepcopy(default) if default is not None else cls()
    for name, tp in types_.items():
        if name not in raw:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            setattr(obj, name, build(tp, raw[name], key + ".", where, default=getattr(obj, name)))
        else:
            setattr(obj, name, check_value(tp, raw[name], key, where(key)))
    return obj


def check_value(tp: Any, value: Any, key: str, where: str, current: Any = None) -> Any:
    """Check (and gently coerce) one leaf value against its annotation; a mapping given for a
    section is merged into `current`, the section's present value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(inner[0], value, key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return build(tp, value, key + ".", lambda _k: where, default=current)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "5e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan slips through every range check (nan <= 0 is False)
            raise ConfigError(f"{where}: {key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [check_value(args[0], item, f"{key}[{i}]", where) for i, item in enumerate(value)]
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")


def split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def did_you_mean(key: str, options) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def get(cfg: Any, key: str) -> Any:
    """cfg value at a dotted key path."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
