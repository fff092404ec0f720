"""megatron-core ``GPTModel`` tensors (full size, local-spec names) -> the Hugging Face tensors of
the architecture :mod:`megadistill.hf.hf_config` chose: the converse of :mod:`megadistill.hf.weights`.

Per layer ``i`` (``h`` hidden size, ``nq`` query heads, ``ng`` key/value heads, ``d`` head
dimension, ``f`` MLP size; ``[out, in]`` weights in both):

- ``self_attention.linear_qkv.weight`` ``[(nq + 2·ng)·d, h]``, megatron-core's grouped layout (per
  key/value group: its ``nq/ng`` query heads, its key, its value) -> ``self_attn.{q,k,v}_proj.weight``
  ``[nq·d, h]``, ``[ng·d, h]``, ``[ng·d, h]``; its bias likewise;
- ``self_attention.linear_proj`` -> ``self_attn.o_proj``;
- ``self_attention.{q,k}_layernorm.weight`` ``[d]`` -> ``self_attn.{q,k}_norm.weight`` (qwen3);
- Llama family: ``mlp.linear_fc1`` ``[2·f, h]`` = ``[gate; up]`` -> ``mlp.gate_proj`` and
  ``mlp.up_proj``, ``mlp.linear_fc2`` -> ``mlp.down_proj``; starcoder2: ``mlp.linear_fc1`` ->
  ``mlp.c_fc``, ``mlp.linear_fc2`` -> ``mlp.c_proj``;
- ``input_layernorm`` -> ``input_layernorm``, ``pre_mlp_layernorm`` -> ``post_attention_layernorm``
  (weight, and bias for LayerNorm);
- ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight``,
  ``decoder.final_layernorm`` -> ``model.norm``, ``output_layer.weight`` -> ``lm_head.weight``
  (untied models only: a tied model has none, as Hugging Face saves it).

The embedding and output rows past ``vocab_size`` (the tokenizer's ids) are the run's vocabulary
padding, which no id reaches: dropped. Tensors are cast to the export dtype and copied (each owns
its storage, as safetensors needs). A tensor the mapping does not know, or one missing, is refused
with an ``ExportError`` naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megadistill.config import ModelConfig
from megadistill.hf.errors import ExportError

if TYPE_CHECKING:
    import torch


def hf_state_dict(state: dict, model: ModelConfig, model_type: str, vocab_size: int, dtype: "torch.dtype",
                  where: str = "the checkpoint") -> dict[str, "torch.Tensor"]:
    """The Hugging Face ``model_type`` tensors of the full megatron-core state dict ``state`` of
    ``model``, in ``dtype``, with ``vocab_size`` embedding rows, in the order a reader expects
    (embedding, layers, final norm, head); see the module docstring. ``where`` names the
    checkpoint in errors."""
    import torch

    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    d = model.kv_channels or model.hidden_size // heads
    gelu = model_type == "starcoder2"
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ExportError(f"{where}: tensor {name} is missing (the recorded model.* architecture has it)")
        used.add(name)
        return state[name]

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(dtype=dtype, copy=True).contiguous()

    def rows(name: str) -> torch.Tensor:
        t = take(name)
        if t.shape[0] < vocab_size:
            raise ExportError(f"{where}: {name} has {t.shape[0]} rows, fewer than the tokenizer's {vocab_size} ids")
        return t[:vocab_size]

    def ungrouped(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # [(nq + 2·ng)·d, ...] -> [ng, (nq/ng + 2)·d, ...] -> q [nq·d, ...], k [ng·d, ...], v [ng·d, ...]
        rest = t.shape[1:]
        per_group = t.reshape(groups, (heads // groups + 2) * d, *rest)
        q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
        return q.reshape(heads * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)

    put("model.embed_tokens.weight", rows("embedding.word_embeddings.weight"))
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn, mlp = dst + "self_attn.", dst + "mlp."
        norms = ("weight", "bias") if model.normalization == "LayerNorm" else ("weight",)
        for part in norms:
            put(f"{dst}input_layernorm.{part}", take(f"{src}input_layernorm.{part}"))
        biased = ("weight", "bias") if model.add_bias_linear or model.add_qkv_bias else ("weight",)
        for part in biased:
            for proj, t in zip("qkv", ungrouped(take(f"{src}self_attention.linear_qkv.{part}"))):
                put(f"{attn}{proj}_proj.{part}", t)
        linear = ("weight", "bias") if model.add_bias_linear else ("weight",)
        for part in linear:
            put(f"{attn}o_proj.{part}", take(f"{src}self_attention.linear_proj.{part}"))
        if model.qk_layernorm:
            for which in "qk":
                put(f"{attn}{which}_norm.weight", take(f"{src}self_attention.{which}_layernorm.weight"))
        for part in norms:
            put(f"{dst}post_attention_layernorm.{part}", take(f"{src}pre_mlp_layernorm.{part}"))
        for part in linear:
            fc1, fc2 = take(f"{src}mlp.linear_fc1.{part}"), take(f"{src}mlp.linear_fc2.{part}")
            if gelu:
                put(f"{mlp}c_fc.{part}", fc1)
                put(f"{mlp}c_proj.{part}", fc2)
            else:
                gate, up = fc1.chunk(2, dim=0)  # megatron-core's gated unit: silu(first half) * second half
                put(f"{mlp}gate_proj.{part}", gate)
                put(f"{mlp}up_proj.{part}", up)
                put(f"{mlp}down_proj.{part}", fc2)
    for part in ("weight", "bias") if model.normalization == "LayerNorm" else ("weight",):
        put(f"model.norm.{part}", take(f"decoder.final_layernorm.{part}"))
    if model.untie_embeddings_and_output_weights:
        put("lm_head.weight", rows("output_layer.weight"))
    unknown = sorted(set(state) - used)
    if unknown:
        shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise ExportError(f"{where}: {len(unknown)} tensor(s) the {model_type} mapping does not know: {shown} (is the "
                          "recorded model.* architecture the checkpoint's?)")
    return out
