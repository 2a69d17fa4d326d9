"""Configs from YAML with dotted `key=value` overrides, and back (the dataclasses are in schema.py).

    cfg = load_config("configs/llama2-7b.yaml", ["optimizer.learning_rate=2e-5", "mesh.tensor=4"])

A value is checked against its field's type annotation (int, float, str, bool, X | None, tuple[...]); unknown
keys and wrong types are ConfigErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from typing import Any, Sequence

import fsspec
import yaml

from agentlm_jax.config.schema import TrainConfig
from agentlm_jax.errors import ConfigError

# ------------------------------------------------------------------------------------------ dict <-> config
def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-able) nested dict of a config; tuples become lists."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, starting from its defaults; every value is type-checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(_join(where, k) for k in unknown)}; "
                          f"{where or 'the top level'} has: {', '.join(sorted(names))}")
    base = cls()
    kwargs = {}
    for name, value in values.items():
        key = _join(where, name)
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping (a config section), got {value!r}")
            kwargs[name] = from_dict(hints[name], {**to_dict(getattr(base, name)), **value}, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, str, bool, X | None, tuple[...]), or a ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or (Any,) * len(value))))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, value, tp)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    return _bad(key, value, tp)


def _bad(key: str, value: Any, tp: Any):
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------------------------- YAML and overrides
def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """['optimizer.learning_rate=1e-5', 'mesh.tensor=2'] -> a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.learning_rate=1e-5)")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "rt") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return values or {}


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The defaults, updated by the YAML file at `path` (if any), then by the dotted `key=value` overrides."""
    values = read_yaml(path) if path else {}
    values = merge(values, parse_overrides(overrides))
    try:
        return from_dict(TrainConfig, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_yaml(cfg: TrainConfig) -> str:
    buf = io.StringIO()
    yaml.safe_dump(to_dict(cfg), buf, sort_keys=False)
    return buf.getvalue()
