"""Reading a run configuration: YAML file → dict → dotted command-line overrides → dataclasses,
then the schema check (:func:`megadistill.config.validate.validate`).

Every error names the key and the bad value. Loading never reads the run's data, tokenizer or
checkpoints: the commands call ``megadistill.preflight.preflight`` for that."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from megadistill.config.schema import ConfigError, RunConfig
from megadistill.config.validate import validate


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


# Numbers in exponent form without a dot ("1e-3", "5E+4"), which YAML 1.1 reads as strings.
_YAML_FLOAT_STRING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (a field annotation), or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp in (dict, typing.Dict) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in (list, typing.List) or origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(tp)
        if item:  # list[float]: each element as that type
            return [_coerce(v, item[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return [str(v) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML_FLOAT_STRING.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; every user means a number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {key}{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own validation (KDLossConfig's), named by its config key
        raise ConfigError(str(e).replace("KDLossConfig.", f"{prefix}." if prefix else "")) from e


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["kd.temperature=2.0", ...]`` → ``[("kd.temperature", 2.0), ...]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", k):
            raise ConfigError(f"override {item!r}: {k!r} is not a dotted key such as kd.temperature")
        out.append((k, yaml.safe_load(v)))
    return out



def config_from_dict(data: dict, overrides: list[str] | None = None, *, world_size: int | None = None) -> RunConfig:
    """Build a RunConfig from a (YAML-shaped) dict plus dotted overrides, and check its schema for
    ``world_size`` ranks (None = unknown)."""
    data = dict(data or {})
    for k, v in parse_overrides(overrides or []):
        _set_dotted(data, k, v)
    _tokenizer_block(data)
    cfg = _build(RunConfig, data)
    validate(cfg, world_size=world_size)
    return cfg


def _tokenizer_block(data: dict) -> None:
    """``data.tokenizer: {type, path}`` is the block form of ``data.tokenizer_type`` and
    ``data.tokenizer_model``; rewritten in place to those keys (giving both forms is an error)."""
    d = data.get("data")
    if not isinstance(d, dict) or "tokenizer" not in d:
        return
    d = dict(d)  # the caller's mapping stays as it was
    block = d.pop("tokenizer")
    if not isinstance(block, dict) or not set(block) <= {"type", "path"}:
        raise ConfigError(f"data.tokenizer must be a mapping with keys type and path, got {block!r}")
    for short, flat in (("type", "tokenizer_type"), ("path", "tokenizer_model")):
        if short in block:
            if flat in d:
                raise ConfigError(f"data.tokenizer.{short} and data.{flat} say the same thing: give one of them")
            d[flat] = block[short]
    data["data"] = d



def load_config(path: str | Path | None, overrides: list[str] | None = None, *, world_size: int | None = None) -> RunConfig:
    """Read a YAML run file (None = all defaults), apply overrides, check the schema (see
    :func:`config_from_dict`). Before a run, pass ``world_size=megadistill.launch.resolve().world_size``."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides, world_size=world_size)
