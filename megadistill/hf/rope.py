"""The RoPE settings of a Hugging Face ``config.json``, read as ``transformers`` reads them.

A ``config.json`` can state RoPE in three places: ``rope_theta`` (transformers 4), the
``rope_scaling`` object (transformers 4) and the ``rope_parameters`` object (transformers 5, which
folds ``rope_theta`` into it). Which one wins is not obvious: transformers 5 reads
``rope_scaling`` *before* ``rope_parameters``, so a file holding both is a Llama 3 model to
transformers when ``rope_scaling`` says ``llama3``, whatever ``rope_parameters`` says.

Where ``transformers`` is installed (an optional dependency), :func:`rope_base` asks it: the
config is read by ``transformers.AutoConfig.from_pretrained`` from local files only, and the RoPE
type, base and partial rotary factor are taken from the ``rope_parameters`` it normalises to.
Without it, the same precedence is applied here, as transformers 5 documents and implements it
(``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` / ``standardize_rope_params``):

1. the settings are ``rope_scaling`` when it is a non-empty object, else ``rope_parameters``;
2. their ``rope_type``, else their legacy ``type``, else ``default``;
3. their ``rope_theta``, else the top-level ``rope_theta``, else 10000;
4. their ``partial_rotary_factor``, else the top-level one, else 1 (whole heads rotate).

Where both readings exist they must agree. Refused, with a ``ConversionError`` naming the file and
the key: any RoPE type but ``default`` (llama3, linear, dynamic, yarn, longrope, ...), wherever the
file states it; ``rope_scaling`` and ``rope_parameters`` that differ; RoPE bases stated twice with
different values (``rope_theta`` and ``rope_parameters.rope_theta``); per-layer RoPE settings;
partial rotary; a base that is not a positive whole number (``teacher.model.rotary_base``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Optional

from megadistill.hf.errors import ConversionError

DEFAULT_THETA = 10000.0
"""The RoPE base of a config that states none (transformers' ``default_theta`` for Llama, Qwen2,
Mistral)."""

_OBJECTS = ("rope_scaling", "rope_parameters")
_NUMBERS = ("rope_theta", "partial_rotary_factor")


def rope_base(config: dict, model_type: str, where: str) -> int:
    """RoPE's base (``teacher.model.rotary_base``) of the ``config.json`` dict ``config`` (named
    ``where`` in errors) of a ``model_type`` model, refusing every RoPE setting that is not plain,
    whole-head RoPE and every pair of keys that contradict each other."""
    for key in _OBJECTS:
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConversionError(f"{where}: {key} {value!r} is not an object of RoPE settings")
        nested = sorted(k for k, v in (value or {}).items() if isinstance(v, dict))
        if nested:
            raise ConversionError(f"{where}: {key} holds per-layer RoPE settings ({', '.join(nested)}), which the "
                                  "converter does not map")
    documented = _documented_reading(config)
    read = _transformers_reading(config, model_type, where)
    reading = read if read is not None else documented
    both = config.get("rope_parameters") is not None
    _refuse_scaling(where, reading["rope_type"], *documented["source"].split("."), both)
    for key in _OBJECTS:  # a scaling type any RoPE object states, even one transformers ignores
        for field in ("rope_type", "type"):
            value = (config.get(key) or {}).get(field, "default")
            _refuse_scaling(where, value, key, field, both)
    scaling, params = config.get("rope_scaling"), config.get("rope_parameters")
    if scaling and params is not None and scaling != params:
        raise ConversionError(f"{where}: rope_scaling {scaling!r} and rope_parameters {params!r} differ (transformers "
                              "reads rope_scaling and ignores rope_parameters): keep one of them")
    for name in _NUMBERS:
        stated = _stated(config, name)
        for other, value in stated[1:]:
            if value != stated[0][1]:
                raise ConversionError(f"{where}: {stated[0][0]} {stated[0][1]!r} and {other} {value!r} contradict "
                                      "each other: keep one of them")
    if read is not None and {k: read[k] for k in ("rope_type",) + _NUMBERS} != {
            k: documented[k] for k in ("rope_type",) + _NUMBERS}:
        raise ConversionError(f"{where}: transformers reads the RoPE settings as {_show(read)}, not {_show(documented)} "
                              "as transformers 5 documents them: refused rather than guessed")
    partial = reading["partial_rotary_factor"]
    if partial != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {partial!r} is not supported (the Llama family rotates "
                              "whole heads)")
    theta = reading["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0 or float(theta) != int(theta):
        raise ConversionError(f"{where}: rope_theta {theta!r} must be a positive whole number (teacher.model.rotary_base)")
    return int(theta)


def _refuse_scaling(where: str, rope_type, key: str, field: str, both: bool) -> None:
    if rope_type == "default":
        return
    why = "; transformers reads rope_scaling before rope_parameters" if key == "rope_scaling" and both else ""
    raise ConversionError(f"{where}: {key}.{field} is {rope_type!r}: RoPE scaling {rope_type!r} is not supported, only "
                          f"plain RoPE (rope_type 'default') maps onto megatron-core's rotary embedding here{why}")


def _stated(config: dict, name: str) -> list[tuple[str, object]]:
    """Every place ``config`` states the RoPE number ``name``: ``[(key, value)]``."""
    found = [(name, config[name])] if name in config else []
    for key in _OBJECTS:
        if isinstance(config.get(key), dict) and name in config[key]:
            found.append((f"{key}.{name}", config[key][name]))
    return found


def _documented_reading(config: dict) -> dict:
    """The RoPE settings by transformers 5's precedence (the module's docstring), without it."""
    scaling = config.get("rope_scaling")
    if scaling:
        settings, source = scaling, "rope_scaling"
    else:
        settings, source = config.get("rope_parameters") or {}, "rope_parameters"
    field = "rope_type" if "rope_type" in settings or "type" not in settings else "type"
    return {
        "rope_type": settings.get(field, "default"),
        "rope_theta": settings.get("rope_theta", config.get("rope_theta", DEFAULT_THETA)),
        "partial_rotary_factor": settings.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)),
        "source": f"{source}.{field}",
    }


def _transformers_reading(config: dict, model_type: str, where: str) -> Optional[dict]:
    """The RoPE settings ``transformers`` reads from ``config`` (None where it is not installed):
    the dict is written to a temporary ``config.json`` for ``AutoConfig.from_pretrained``, local
    files only, no remote code."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    data = copy.deepcopy(config)
    data.setdefault("model_type", model_type)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on deprecated keys: the refusals below say what matters
    try:
        with tempfile.TemporaryDirectory(prefix="megadistill-hf-config-") as d:
            (Path(d) / "config.json").write_text(json.dumps(data), encoding="utf-8")
            hf = transformers.AutoConfig.from_pretrained(d, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises ValueError, OSError and its own validation errors
        raise ConversionError(f"{where}: transformers {transformers.__version__} cannot read it as a {model_type} "
                              f"config ({' '.join(str(err).split())[:300]})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if hf.model_type != model_type:
        raise ConversionError(f"{where}: transformers reads it as model_type {hf.model_type!r}, not {model_type!r}, "
                              "which the converter does not map")
    settings = getattr(hf, "rope_parameters", None) or {}
    if any(isinstance(v, dict) for v in settings.values()):
        raise ConversionError(f"{where}: transformers reads per-layer RoPE settings ({', '.join(sorted(settings))}), "
                              "which the converter does not map")
    return {
        "rope_type": settings.get("rope_type", "default"),
        "rope_theta": settings.get("rope_theta", DEFAULT_THETA),
        "partial_rotary_factor": settings.get("partial_rotary_factor", 1.0),
    }


def _show(reading: dict) -> str:
    return ", ".join(f"{k} {reading[k]!r}" for k in ("rope_type",) + _NUMBERS)
