"""A student's architecture (``model``, a ``ModelConfig``) -> the Hugging Face architecture that
computes the same function, as its ``config.json`` (``megadistill export-hf``); the converse of
:mod:`megadistill.hf.architecture`.

Which architecture expresses which student exactly (``--model-type``; the default in bold):

- **starcoder2**: LayerNorm (with bias) and a plain GeLU MLP -- the default student shape.
  ``hidden_act`` ``gelu`` is torch's exact (erf) GeLU, as megatron-core's ``F.gelu`` (Starcoder2's
  own default, ``gelu_pytorch_tanh``, is the tanh approximation); ``use_bias`` puts biases on
  q/k/v/o, ``c_fc`` and ``c_proj``, which is ``add_bias_linear`` (megatron-core's query/key/value
  projection has a bias whenever the other layers do); the norm epsilon is ``norm_epsilon``;
  residual, embedding and attention dropout 0, no sliding window;
- **llama**: RMSNorm and SwiGLU, with biases everywhere (``attention_bias`` and ``mlp_bias``:
  ``add_bias_linear``) or nowhere; **qwen2**: the same with query/key/value biases only
  (``add_qkv_bias`` without ``add_bias_linear``); **qwen3**: the same with ``qk_layernorm`` and no
  biases; ``mistral``: the same with no biases.

Every one: RoPE over whole heads (``rotary_percent`` 1) with base ``rope_theta``, rotating the two
halves of each head as megatron-core does; ``head_dim`` = ``kv_channels`` (else hidden size /
heads; the attention scale is ``head_dim ** -0.5`` in both); grouped-query attention
(``num_key_value_heads``); ``tie_word_embeddings`` = not ``untie_embeddings_and_output_weights``
(the output layer has no bias in either); megatron-core's Llama 3.x RoPE scaling
(``rope_scaling_factor``) as ``rope_scaling`` ``{rope_type: llama3, factor, low_freq_factor 1,
high_freq_factor 4, original_max_position_embeddings 8192}``, the constants megatron-core uses.
RoPE is written as ``rope_theta`` / ``rope_scaling``, which transformers 4 reads and transformers
5 folds into its ``rope_parameters``.

What no architecture expresses is refused with an :class:`~megadistill.hf.errors.ExportError`
naming every ``model.*`` key to change: partial rotary, LayerNorm with SwiGLU, RMSNorm with GeLU,
and per architecture the biases or query/key norms it lacks. Dropout is a training setting: the
exported model has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadistill.config import ModelConfig
from megadistill.hf.errors import ExportError
from megadistill.hf.rope import LLAMA3_FIXED

EXPORT_MODEL_TYPES = ("starcoder2", "llama", "qwen2", "qwen3", "mistral")
"""``--model-type`` values of ``export-hf``."""

HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""megadistill precision -> Hugging Face's ``torch_dtype`` name."""

# megatron-core's fixed Llama 3.x constants (``rope_scaling_factor`` is the factor), as Hugging Face writes them.
LLAMA3_ROPE = {k: float(v) if k.endswith("freq_factor") else v for k, v in LLAMA3_FIXED.items()}

_CLASSES = {"starcoder2": "Starcoder2ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass
class ExportArchitecture:
    """What a student maps to."""

    model_type: str
    config: dict
    """``config.json``."""
    tied: bool
    """The output layer reuses the embedding (no ``lm_head.weight`` is written)."""


def default_model_type(model: ModelConfig) -> str:
    """The architecture a student exports to without ``--model-type``: starcoder2 for LayerNorm
    students, else qwen3 with query/key norms, qwen2 with query/key/value biases only, llama
    otherwise (refused later if even that does not fit)."""
    if model.normalization == "LayerNorm":
        return "starcoder2"
    if model.qk_layernorm:
        return "qwen3"
    if model.add_qkv_bias and not model.add_bias_linear:
        return "qwen2"
    return "llama"


def problems(model: ModelConfig, model_type: str) -> list[str]:
    """Why ``model_type`` cannot express ``model`` exactly: one entry per ``model.*`` key to
    change, empty when it can."""
    found = []
    m = model
    if m.rotary_percent != 1.0:
        found.append(f"model.rotary_percent {m.rotary_percent}: the Hugging Face architectures exported to rotate "
                     "whole heads (set it to 1.0)")
    if m.normalization == "LayerNorm" and m.activation == "swiglu":
        found.append("model.activation swiglu with normalization LayerNorm: no exported architecture combines them "
                     "(starcoder2 has LayerNorm and GeLU, the Llama family RMSNorm and SwiGLU)")
        return found
    if m.normalization == "RMSNorm" and m.activation == "gelu":
        found.append("model.activation gelu with normalization RMSNorm: no exported architecture combines them "
                     "(starcoder2 has LayerNorm and GeLU, the Llama family RMSNorm and SwiGLU)")
        return found
    family = "LayerNorm and GeLU" if model_type == "starcoder2" else "RMSNorm and SwiGLU"
    if (m.normalization == "LayerNorm") != (model_type == "starcoder2"):
        found.append(f"model.normalization {m.normalization} with activation {m.activation}: {model_type} has {family} "
                     f"(--model-type {default_model_type(m)})")
        return found
    qkv_only = m.add_qkv_bias and not m.add_bias_linear
    if model_type in ("starcoder2", "llama") and qkv_only:
        hint = "" if model_type == "starcoder2" else " (--model-type qwen2 has exactly those)"
        found.append(f"model.add_qkv_bias true with add_bias_linear false: {model_type} has biases in every linear layer "
                     f"or in none{hint}")
    if model_type == "qwen2" and not qkv_only:
        found.append(f"model.add_qkv_bias {str(m.add_qkv_bias).lower()} with add_bias_linear "
                     f"{str(m.add_bias_linear).lower()}: qwen2 has query/key/value biases and no others")
    if model_type in ("qwen3", "mistral") and (m.add_bias_linear or m.add_qkv_bias):
        key = "add_bias_linear" if m.add_bias_linear else "add_qkv_bias"
        found.append(f"model.{key} true: {model_type} has no biases")
    if m.qk_layernorm and model_type != "qwen3":
        found.append(f"model.qk_layernorm true: {model_type} has no query/key norms (qwen3 has)")
    if model_type == "qwen3" and not m.qk_layernorm:
        found.append("model.qk_layernorm false: qwen3 normalises every query and key head (--model-type llama has no "
                     "such norms)")
    return found


def hf_config(model: ModelConfig, model_type: Optional[str], *, vocab_size: int, max_position_embeddings: int,
              dtype: str, eos_token_id: Optional[int], bos_token_id: Optional[int] = None,
              where: str = "the student") -> ExportArchitecture:
    """``config.json`` of the ``model_type`` model (None: :func:`default_model_type`) that computes
    ``model``, with ``vocab_size`` rows (the tokenizer's ids), weights in ``dtype`` (fp32, bf16,
    fp16) and the tokenizer's end-of-text id. Raises ``ExportError`` naming ``where`` and every
    ``model.*`` key no architecture can express."""
    kind = model_type or default_model_type(model)
    if kind not in EXPORT_MODEL_TYPES:
        raise ExportError(f"--model-type {kind!r} is not one export-hf writes ({', '.join(EXPORT_MODEL_TYPES)})")
    found = problems(model, kind)
    if found:
        raise ExportError(f"{where} cannot be exported as {kind} exactly: {'; '.join(found)}")
    m = model
    heads = m.num_attention_heads
    config = {
        "architectures": [_CLASSES[kind]],
        "model_type": kind,
        "vocab_size": vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": m.num_query_groups or heads,
        "head_dim": m.kv_channels or m.hidden_size // heads,
        "hidden_act": "gelu" if kind == "starcoder2" else "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": m.init_method_std,
        "rope_theta": float(m.rotary_base),
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": HF_DTYPES[dtype],
    }
    if m.rope_scaling_factor is not None:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": float(m.rope_scaling_factor), **LLAMA3_ROPE}
    if kind == "starcoder2":
        config.update(norm_epsilon=m.layernorm_epsilon, use_bias=m.add_bias_linear, residual_dropout=0.0,
                      embedding_dropout=0.0, sliding_window=None)
    else:
        config["rms_norm_eps"] = m.layernorm_epsilon
    if kind == "llama":
        config.update(attention_bias=m.add_bias_linear, mlp_bias=m.add_bias_linear, pretraining_tp=1)
    if kind == "mistral":
        config["sliding_window"] = None
    if kind in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if kind == "qwen3":
        config["attention_bias"] = False
    return ExportArchitecture(kind, config, not m.untie_embeddings_and_output_weights)
