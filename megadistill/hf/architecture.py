"""Hugging Face ``config.json`` -> ``teacher.model``: the architecture of a Llama / Qwen2 / Mistral
checkpoint as a megadistill ``ModelConfig`` (RMSNorm, SwiGLU, RoPE, grouped-query attention,
untied or tied embeddings, Qwen2's query/key/value biases).

What cannot be mapped is refused with a ``ConversionError`` naming the file and key: an unknown
``model_type``, RoPE scaling or contradicting RoPE keys (read as ``transformers`` reads them:
:mod:`megadistill.hf.rope`), partial rotary, another activation than SiLU, a ``head_dim`` other than
``hidden_size / num_attention_heads``, and biases megatron-core cannot place (Llama's
``attention_bias`` without ``mlp_bias``, or the reverse). A sliding window that is in use caps
``max_position_embeddings`` at the window: up to that length sliding-window attention equals
full causal attention, and a longer ``data.seq_length`` is refused by the config check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadistill.config import ModelConfig
from megadistill.hf.errors import ConversionError
from megadistill.hf.read import CONFIG_FILE
from megadistill.hf.rope import rope_base

MODEL_TYPES = ("llama", "qwen2", "mistral")
"""``config.json`` ``model_type`` values the converter maps (``--model-type``)."""


@dataclass
class TeacherArchitecture:
    """What ``config.json`` maps to."""

    model: ModelConfig
    """``teacher.model`` (``make_vocab_size_divisible_by`` set by :func:`convert`)."""
    model_type: str
    hf_vocab_size: int
    """Rows of the Hugging Face embedding (``config.json`` ``vocab_size``)."""
    tied: bool
    notes: list
    """What the mapping changed or capped, for the snippet's comments."""


def model_config(config: dict, model_type: Optional[str] = None, where: str = CONFIG_FILE) -> TeacherArchitecture:
    """Map a Hugging Face ``config.json`` (a dict; ``where`` names it in errors) onto a
    ``ModelConfig``. ``model_type`` (``--model-type``) must agree with the file's when both are given."""

    def need(key: str, kind=int):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConversionError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
        return value

    found = config.get("model_type")
    if model_type is not None and found is not None and found != model_type:
        raise ConversionError(f"{where}: model_type is {found!r}, not the {model_type!r} asked for (--model-type)")
    kind = model_type or found
    if kind not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {kind!r} is not one the converter maps ({', '.join(MODEL_TYPES)}); "
                              "give --model-type for a llama-shaped model of another name")
    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(f"{where}: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"{where}: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{hidden // heads}, which megatron-core's attention assumes")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not silu (megatron-core's SwiGLU here)")
    notes = []
    theta = rope_base(config, kind, where)
    max_pos = need("max_position_embeddings")
    window = _used_sliding_window(config, kind)
    if window is not None and window < max_pos:
        notes.append(f"sliding_window {window} is in use: max_position_embeddings capped at {window} (up to that length "
                     "sliding-window attention is full causal attention)")
        max_pos = window
    qkv_bias, linear_bias = _biases(config, kind, where)
    tied = bool(config.get("tie_word_embeddings", False))
    model = ModelConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=need("intermediate_size"), normalization="RMSNorm",
        layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)), activation="swiglu",
        untie_embeddings_and_output_weights=not tied, rotary_base=theta, rotary_percent=1.0,
        add_bias_linear=linear_bias, add_qkv_bias=qkv_bias, max_position_embeddings=max_pos,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return TeacherArchitecture(model, kind, need("vocab_size"), tied, notes)


def _used_sliding_window(config: dict, kind: str) -> Optional[int]:
    window = config.get("sliding_window")
    if not window:
        return None
    if kind == "qwen2" and not config.get("use_sliding_window", False):
        return None  # Qwen2 ships a window size but attends fully unless use_sliding_window is set
    return int(window)


def _biases(config: dict, kind: str, where: str) -> tuple[bool, bool]:
    """``(add_qkv_bias, add_bias_linear)``: Qwen2 has query/key/value biases only; Llama may have
    biases everywhere (``attention_bias`` and ``mlp_bias``), which is megatron-core's
    ``add_bias_linear``; Mistral none."""
    if kind == "qwen2":
        return True, False
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if attention != mlp:
        raise ConversionError(f"{where}: attention_bias {attention} with mlp_bias {mlp}: megatron-core's add_bias_linear "
                              "puts biases in every linear layer or in none")
    return False, attention
