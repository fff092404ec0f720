"""Hugging Face ``config.json`` -> ``teacher.model``: the architecture of a Llama (1, 2, 3.x), Qwen2 /
Qwen2.5, Qwen3 (dense) or Mistral checkpoint as a megadistill ``ModelConfig``.

Mapped: RMSNorm, SwiGLU, grouped-query attention, untied or tied embeddings; RoPE, plain or with
Llama 3.x scaling (``rotary_base``, ``rope_scaling_factor``; read as ``transformers`` reads it:
:mod:`megadistill.hf.rope`); a ``head_dim`` other than ``hidden_size / num_attention_heads``
(``kv_channels``; Qwen3's default when the file states none is 128, as ``Qwen3Config``'s);
Qwen2's query/key/value biases (``add_qkv_bias``); Llama's biases everywhere (``attention_bias``
with ``mlp_bias``: ``add_bias_linear``); Qwen3's per-head query/key RMSNorms (``qk_layernorm``,
the model's ``rms_norm_eps``, applied before RoPE as transformers applies ``q_norm``/``k_norm``).

A sliding window that is in use (Mistral's ``sliding_window``; Qwen2's and Qwen3's only with
``use_sliding_window``, as their configs drop the window otherwise) caps
``max_position_embeddings`` at the window: up to that length sliding-window attention equals full
causal attention, and a longer ``data.seq_length`` is refused by the config check.

Refused with a ``ConversionError`` naming the file and key: a ``model_type`` not in
:data:`MODEL_TYPES` (mixture-of-experts models such as Mixtral and Qwen3-MoE, Gemma's softcapping
and sandwich norms, ...), RoPE the rotary embedding cannot compute (:mod:`megadistill.hf.rope`),
another activation than SiLU, an odd ``head_dim`` (RoPE rotates pairs), biases megatron-core cannot
place (Llama's ``attention_bias`` without ``mlp_bias`` or the reverse; Qwen3's ``attention_bias``,
which biases ``o_proj`` but no MLP layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadistill.config import ModelConfig
from megadistill.hf.errors import ConversionError
from megadistill.hf.read import CONFIG_FILE
from megadistill.hf.rope import LLAMA3_FIXED, rope_settings

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
"""``config.json`` ``model_type`` values the converter maps (``--model-type``)."""

QWEN3_HEAD_DIM = 128
"""``Qwen3Config``'s ``head_dim`` when ``config.json`` states none (not hidden / heads)."""

# Keys that make a config a mixture of experts, whatever its model_type says.
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


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
    experts = [k for k in _EXPERT_KEYS if config.get(k)]
    if experts:
        raise ConversionError(f"{where}: {experts[0]} is {config[experts[0]]!r}: a mixture-of-experts model "
                              f"(model_type {kind!r}), which the converter does not map (it maps the dense "
                              f"{', '.join(MODEL_TYPES)})")
    if kind not in MODEL_TYPES:
        raise ConversionError(f"{where}: model_type {kind!r} is not one the converter maps ({', '.join(MODEL_TYPES)}); "
                              "give --model-type for a llama-shaped model of another name")
    hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise ConversionError(f"{where}: num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                              "(teacher.model needs it)")
    head_dim = _head_dim(config, kind, hidden // heads, where)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act {act!r} is not silu (megatron-core's SwiGLU here)")
    notes = []
    if kind == "qwen3" and "head_dim" not in config:
        notes.append(f"head_dim not stated: Qwen3's default {QWEN3_HEAD_DIM}")
    rope = rope_settings(config, kind, where)
    if rope.scaling_factor is not None:
        notes.append(f"Llama 3 RoPE scaling, factor {rope.scaling_factor:g} (low/high frequency factors "
                     f"{LLAMA3_FIXED['low_freq_factor']} and {LLAMA3_FIXED['high_freq_factor']}, original context "
                     f"{LLAMA3_FIXED['original_max_position_embeddings']})")
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
        untie_embeddings_and_output_weights=not tied, rotary_base=rope.base, rotary_percent=1.0,
        rope_scaling_factor=rope.scaling_factor,
        kv_channels=None if head_dim == hidden // heads else head_dim,  # None: megatron-core's hidden / heads
        qk_layernorm=kind == "qwen3",
        add_bias_linear=linear_bias, add_qkv_bias=qkv_bias, max_position_embeddings=max_pos,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return TeacherArchitecture(model, kind, need("vocab_size"), tied, notes)


def _head_dim(config: dict, kind: str, default: int, where: str) -> int:
    """Each attention head's width as ``transformers`` builds the ``kind`` model: ``head_dim``,
    else ``hidden_size / num_attention_heads`` (Llama, Mistral, Qwen2; also for a ``head_dim`` of
    null) or 128 (Qwen3, whose config cannot be null there)."""
    if "head_dim" not in config:
        return QWEN3_HEAD_DIM if kind == "qwen3" else default
    value = config["head_dim"]
    if value is None and kind != "qwen3":
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{where}: head_dim must be a positive integer, got {value!r}")
    if value % 2:
        raise ConversionError(f"{where}: head_dim {value} is odd: RoPE rotates pairs of a head's dimensions")
    return value


def _used_sliding_window(config: dict, kind: str) -> Optional[int]:
    window = config.get("sliding_window")
    if not window:
        return None
    if kind in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        return None  # Qwen2/Qwen3 ship a window size but attend fully unless use_sliding_window is set
    return int(window)


def _biases(config: dict, kind: str, where: str) -> tuple[bool, bool]:
    """``(add_qkv_bias, add_bias_linear)``: Qwen2 has query/key/value biases only; Qwen3 none (its
    ``attention_bias`` would bias ``o_proj`` too, but no MLP layer: refused); Llama may have biases
    everywhere (``attention_bias`` and ``mlp_bias``), which is megatron-core's ``add_bias_linear``;
    Mistral none."""
    if kind == "qwen2":
        return True, False
    attention, mlp = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if kind == "qwen3":
        if attention:
            raise ConversionError(f"{where}: attention_bias true: Qwen3 then biases q/k/v_proj and o_proj but no MLP "
                                  "layer, which megatron-core cannot express (add_bias_linear biases every linear layer, "
                                  "add_qkv_bias only q/k/v)")
        return False, False
    if attention != mlp:
        raise ConversionError(f"{where}: attention_bias {attention} with mlp_bias {mlp}: megatron-core's add_bias_linear "
                              "puts biases in every linear layer or in none")
    return False, attention
