"""The RoPE settings of a Hugging Face ``config.json``, read as ``transformers`` reads them.

A ``config.json`` can state RoPE in three places: ``rope_theta`` (transformers 4), the
``rope_scaling`` object (transformers 4) and the ``rope_parameters`` object (transformers 5, which
folds ``rope_theta`` into it). Which one wins is not obvious: transformers 5 reads
``rope_scaling`` *before* ``rope_parameters``, so a file holding both is a Llama 3 model to
transformers when ``rope_scaling`` says ``llama3``, whatever ``rope_parameters`` says.

The same precedence is applied here, as transformers 5 documents and implements it
(``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` / ``standardize_rope_params``):

1. the settings are ``rope_scaling`` when it is a non-empty object, else ``rope_parameters``;
2. their ``rope_type``, else their legacy ``type``, else ``default``;
3. their ``rope_theta``, else the top-level ``rope_theta``, else 10000;
4. their ``partial_rotary_factor``, else the top-level one, else 1 (whole heads rotate);
5. for ``llama3``: their ``factor``, ``low_freq_factor`` and ``high_freq_factor``, and their
   ``original_max_position_embeddings``, else ``max_position_embeddings`` (the Llama-family
   configs do not read a top-level ``original_max_position_embeddings``).

Where ``transformers`` is installed (an optional dependency), it is asked too: the config is read
by ``transformers.AutoConfig.from_pretrained`` from local files only, and the ``rope_parameters``
it normalises to must agree with the reading above.

Mapped: plain RoPE (``rope_type`` ``default``) -> ``rotary_base``; Llama 3.x scaling (``llama3``)
-> ``rotary_base`` and ``rope_scaling_factor``, where megatron-core's scaling is the one
transformers computes (``_compute_llama3_parameters`` and megatron-core's
``RotaryEmbedding._apply_scaling`` are the same formula, both with attention factor 1) but fixes
``low_freq_factor`` 1, ``high_freq_factor`` 4 and ``original_max_position_embeddings`` 8192, as
Llama 3.1, 3.2 and 3.3 ship them.

Refused, with a ``ConversionError`` naming the file and the key: every other RoPE type (linear,
dynamic, yarn, longrope, ...), wherever the file states it; Llama 3 settings other than those
megatron-core fixes, or a ``factor`` below 1; ``rope_scaling`` and ``rope_parameters`` that differ;
``rope_type`` and ``type`` that differ; a number stated twice with different values (``rope_theta``
and ``rope_parameters.rope_theta``, say); per-layer RoPE settings; partial rotary; a base that is not
a positive whole number (``teacher.model.rotary_base``); a transformers reading that differs from
the documented one.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megadistill.hf.errors import ConversionError

DEFAULT_THETA = 10000.0
"""The RoPE base of a config that states none (transformers' ``default_theta`` for Llama, Qwen2,
Qwen3, Mistral)."""

LLAMA3_FIXED = {"low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}
"""What megatron-core's Llama 3 scaling hard-codes (``RotaryEmbedding._apply_scaling``'s defaults;
``GPTModel`` passes only the factor)."""

_MAPPED_TYPES = ("default", "llama3")
_OBJECTS = ("rope_scaling", "rope_parameters")
_NUMBERS = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
_LLAMA3_KEYS = ("factor", *LLAMA3_FIXED)
_COMPARED = ("rope_type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class Rope:
    """What a ``config.json``'s RoPE maps to."""

    base: int
    """``teacher.model.rotary_base``."""
    scaling_factor: Optional[float] = None
    """``teacher.model.rope_scaling_factor``: Llama 3.x scaling's factor; None = plain RoPE."""


def rope_settings(config: dict, model_type: str, where: str) -> Rope:
    """The RoPE of the ``config.json`` dict ``config`` (named ``where`` in errors) of a
    ``model_type`` model, refusing every RoPE setting megatron-core's rotary embedding cannot
    compute exactly and every pair of keys that contradict each other (module docstring)."""
    for key in _OBJECTS:
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConversionError(f"{where}: {key} {value!r} is not an object of RoPE settings")
        nested = sorted(k for k, v in (value or {}).items() if isinstance(v, dict))
        if nested:
            raise ConversionError(f"{where}: {key} holds per-layer RoPE settings ({', '.join(nested)}), which the "
                                  "converter does not map")
    documented = _documented_reading(config)
    both = config.get("rope_parameters") is not None
    _refuse_type(where, documented["rope_type"], *documented["source"].split("."), both)
    for key in _OBJECTS:  # a scaling type any RoPE object states, even one transformers ignores
        for field in ("rope_type", "type"):
            _refuse_type(where, (config.get(key) or {}).get(field, "default"), key, field, both)
        value = config.get(key) or {}
        if "rope_type" in value and "type" in value and value["rope_type"] != value["type"]:
            raise ConversionError(f"{where}: {key}.rope_type {value['rope_type']!r} and {key}.type {value['type']!r} "
                                  "contradict each other (transformers reads rope_type): keep one of them")
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
    factor = _llama3_factor(config, documented, where) if documented["rope_type"] == "llama3" else None
    read = _transformers_reading(config, model_type, where)
    if read is not None:
        keys = _COMPARED + (_LLAMA3_KEYS if documented["rope_type"] == "llama3" else ())
        if any(read.get(k) != documented.get(k) for k in keys):
            raise ConversionError(f"{where}: transformers reads the RoPE settings as {_show(read, keys)}, not "
                                  f"{_show(documented, keys)} as transformers 5 documents them: refused rather than "
                                  "guessed")
    partial = documented["partial_rotary_factor"]
    if partial != 1.0:
        raise ConversionError(f"{where}: partial_rotary_factor {partial!r} is not supported (the Llama family rotates "
                              "whole heads)")
    theta = documented["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0 or float(theta) != int(theta):
        raise ConversionError(f"{where}: rope_theta {theta!r} must be a positive whole number (teacher.model.rotary_base)")
    return Rope(int(theta), factor)


def _refuse_type(where: str, rope_type, key: str, field: str, both: bool) -> None:
    if rope_type in _MAPPED_TYPES:
        return
    why = "; transformers reads rope_scaling before rope_parameters" if key == "rope_scaling" and both else ""
    raise ConversionError(f"{where}: {key}.{field} is {rope_type!r}: RoPE scaling {rope_type!r} is not supported, only "
                          "plain RoPE (rope_type 'default') and Llama 3 scaling ('llama3') map onto megatron-core's "
                          f"rotary embedding here{why}")


def _llama3_factor(config: dict, documented: dict, where: str) -> float:
    """The Llama 3 ``factor`` of the documented reading, after checking the settings megatron-core
    fixes (:data:`LLAMA3_FIXED`) are the file's."""
    source = documented["source"].split(".")[0]

    def number(key: str):
        value = documented[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            missing = value is None and key not in (config.get(source) or {})
            raise ConversionError(f"{where}: {source}.{key} is {'missing' if missing else repr(value)}: Llama 3 RoPE "
                                  "scaling needs a number")
        return value

    factor = number("factor")
    if factor < 1:
        raise ConversionError(f"{where}: {source}.factor is {factor!r}: Llama 3 RoPE scaling needs a factor >= 1")
    for key, fixed in LLAMA3_FIXED.items():
        value = number(key)
        if value == fixed:
            continue
        if key in (config.get(source) or {}):
            raise ConversionError(f"{where}: {source}.{key} is {value!r}: megatron-core's Llama 3 scaling fixes it "
                                  f"at {fixed}")
        top = (f" (the top-level original_max_position_embeddings {config['original_max_position_embeddings']!r} "
               "is not read)") if "original_max_position_embeddings" in config else ""
        raise ConversionError(f"{where}: {source}.{key} is not stated, so transformers takes max_position_embeddings "
                              f"{value!r}{top}: megatron-core's Llama 3 scaling fixes it at {fixed}")
    return float(factor)


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
    reading = {
        "rope_type": settings.get(field, "default"),
        "rope_theta": settings.get("rope_theta", config.get("rope_theta", DEFAULT_THETA)),
        "partial_rotary_factor": settings.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)),
        "source": f"{source}.{field}",
    }
    if reading["rope_type"] == "llama3":
        reading.update({k: settings.get(k) for k in _LLAMA3_KEYS})
        reading["original_max_position_embeddings"] = settings.get("original_max_position_embeddings",
                                                                   config.get("max_position_embeddings"))
    return reading


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
    hf_logging.set_verbosity_error()  # its notes on deprecated keys: the refusals here say what matters
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
        **{k: settings.get(k) for k in _LLAMA3_KEYS},
        "rope_type": settings.get("rope_type", "default"),
        "rope_theta": settings.get("rope_theta", DEFAULT_THETA),
        "partial_rotary_factor": settings.get("partial_rotary_factor", 1.0),
    }


def _show(reading: dict, keys: tuple) -> str:
    return ", ".join(f"{k} {reading.get(k)!r}" for k in keys)
