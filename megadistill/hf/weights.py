"""Hugging Face Llama-family tensors (Llama, Qwen2, Qwen3, Mistral) -> megatron-core ``GPTModel``
tensors (local layer spec, TP=1 names), for :func:`megadistill.hf.convert.convert`.

The mapping, per layer (``h`` hidden size, ``nq`` query heads, ``ng`` key/value heads, ``d`` head
dimension: ``teacher.model.kv_channels``, else ``h / nq``; ``f`` MLP size; Hugging Face
``nn.Linear`` weights are ``[out, in]``, as megatron-core's):

- ``self_attn.{q,k,v}_proj.weight`` ``[nq·d, h]``, ``[ng·d, h]``, ``[ng·d, h]`` ->
  ``self_attention.linear_qkv.weight`` ``[(nq + 2·ng)·d, h]`` in megatron-core's grouped layout:
  per key/value group ``g``, its ``nq/ng`` query heads, then key ``g``, then value ``g`` (Hugging
  Face's ``repeat_kv`` gives query head ``i`` the key/value head ``i // (nq/ng)``); Qwen2's
  ``{q,k,v}_proj.bias`` likewise into ``linear_qkv.bias``;
- ``self_attn.o_proj.weight`` ``[h, nq·d]`` -> ``self_attention.linear_proj.weight``;
- Qwen3's ``self_attn.q_norm.weight`` / ``k_norm.weight`` ``[d]`` -> ``self_attention.q_layernorm.weight``
  / ``k_layernorm.weight`` (``qk_layernorm``: one RMSNorm over each head's ``d`` dimensions, shared by
  all heads, before RoPE, in both);
- ``mlp.{gate,up}_proj.weight`` ``[f, h]`` each -> ``mlp.linear_fc1.weight`` ``[2·f, h]`` (gate
  first: megatron-core's gated unit computes ``silu(first half) * second half``);
  ``mlp.down_proj.weight`` ``[h, f]`` -> ``mlp.linear_fc2.weight``;
- ``input_layernorm`` / ``post_attention_layernorm`` ``[h]`` -> ``input_layernorm`` /
  ``pre_mlp_layernorm`` (RMSNorm; saved under the fused names ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight`` by megatron-core's sharded state dict);
- ``model.embed_tokens.weight`` ``[V, h]`` -> ``embedding.word_embeddings.weight`` and
  ``lm_head.weight`` -> ``output_layer.weight`` (tied models have none), ``model.norm`` ->
  ``decoder.final_layernorm``.

Rotary embeddings need no permutation: Hugging Face's Llama-family checkpoints rotate the two
halves of each head (``rotate_half``), as megatron-core's non-interleaved RoPE does.

Vocabulary: the embedding and output layer get the rows the caller asks for (the run's padded
vocabulary). Rows past the model's ``vocab_size`` are zero (megatron-core's own padding when it
reshards a vocabulary); rows past the padded size, which the tokenizer never produces (Qwen2 pads
its embedding beyond its tokenizer), are dropped.

Refused with a ``ConversionError`` naming the file and key: a tied model that ships a different
``lm_head``, an untied one without it, tensors missing or of the wrong shape (a ``head_dim`` the
tensors do not have, say), and tensors the mapping does not know (a family's extra weights, such
as Qwen3's query/key norms read as another ``--model-type``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megadistill.hf.architecture import TeacherArchitecture
from megadistill.hf.errors import ConversionError
from megadistill.hf.read import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, HFCheckpoint

if TYPE_CHECKING:
    import torch

# Buffers some older checkpoints saved next to the weights; recomputed by megatron-core's RoPE.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def convert_state_dict(ckpt: HFCheckpoint, arch: TeacherArchitecture, vocab_rows: int,
                       dtype: Optional["torch.dtype"] = None) -> dict[str, "torch.Tensor"]:
    """The megatron-core ``GPTModel`` state dict (local layer spec, TP=1 names) of ``ckpt``, in
    ``dtype`` (default fp32), with ``vocab_rows`` embedding (and output) rows; see the module docstring."""
    import torch

    dtype = dtype or torch.float32
    m = arch.model
    heads, groups = m.num_attention_heads, m.num_query_groups
    d = m.kv_channels or m.hidden_size // heads  # Qwen3's heads are wider than hidden / heads
    h, f = m.hidden_size, m.ffn_hidden_size
    used: set[str] = set()
    index = ckpt.directory / (SAFETENSORS_INDEX if (ckpt.directory / SAFETENSORS_INDEX).is_file() else SAFETENSORS_FILE)

    def get(name: str, shape: tuple) -> torch.Tensor:
        if name not in ckpt.weight_map:
            raise ConversionError(f"{index}: tensor {name} is missing (a {arch.model_type} checkpoint of this config.json "
                                  "has it)")
        t = ckpt.tensor(name)
        if tuple(t.shape) != shape:
            raise ConversionError(f"{index}: tensor {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        used.add(name)
        return t.to(dtype)

    def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [nq·d, ...], [ng·d, ...], [ng·d, ...] -> [ng, (nq/ng + 2)·d, ...] -> [(nq + 2·ng)·d, ...]
        rest = q.shape[1:]
        q = q.reshape(groups, heads // groups * d, *rest)
        k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * d, *rest)

    out: dict[str, torch.Tensor] = {}
    emb = get("model.embed_tokens.weight", (arch.hf_vocab_size, h))
    has_head = "lm_head.weight" in ckpt.weight_map
    if arch.tied and has_head:  # checked now, so that the Hugging Face embedding is not held to the end
        if not torch.equal(get("lm_head.weight", (arch.hf_vocab_size, h)), emb):
            raise ConversionError(f"{ckpt.directory / CONFIG_FILE}: tie_word_embeddings is true but {index} holds an "
                                  "lm_head.weight that differs from model.embed_tokens.weight")
    out["embedding.word_embeddings.weight"] = _resize_rows(emb, vocab_rows)
    del emb
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        q = get(attn + "q_proj.weight", (heads * d, h))
        k = get(attn + "k_proj.weight", (groups * d, h))
        v = get(attn + "v_proj.weight", (groups * d, h))
        out[dst + "self_attention.linear_qkv.weight"] = grouped(q, k, v)
        if m.add_qkv_bias or m.add_bias_linear:
            out[dst + "self_attention.linear_qkv.bias"] = grouped(
                get(attn + "q_proj.bias", (heads * d,)), get(attn + "k_proj.bias", (groups * d,)),
                get(attn + "v_proj.bias", (groups * d,)))
        out[dst + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight", (h, heads * d))
        if m.qk_layernorm:
            out[dst + "self_attention.q_layernorm.weight"] = get(attn + "q_norm.weight", (d,))
            out[dst + "self_attention.k_layernorm.weight"] = get(attn + "k_norm.weight", (d,))
        mlp = src + "mlp."
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [get(mlp + "gate_proj.weight", (f, h)), get(mlp + "up_proj.weight", (f, h))], dim=0)
        out[dst + "mlp.linear_fc2.weight"] = get(mlp + "down_proj.weight", (h, f))
        if m.add_bias_linear:
            out[dst + "self_attention.linear_proj.bias"] = get(attn + "o_proj.bias", (h,))
            out[dst + "mlp.linear_fc1.bias"] = torch.cat([get(mlp + "gate_proj.bias", (f,)), get(mlp + "up_proj.bias", (f,))])
            out[dst + "mlp.linear_fc2.bias"] = get(mlp + "down_proj.bias", (h,))
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight", (h,))
        out[dst + "pre_mlp_layernorm.weight"] = get(src + "post_attention_layernorm.weight", (h,))
    out["decoder.final_layernorm.weight"] = get("model.norm.weight", (h,))
    if not arch.tied:
        if not has_head:
            raise ConversionError(f"{ckpt.directory / CONFIG_FILE}: tie_word_embeddings is false but {index} holds no "
                                  "lm_head.weight (set tie_word_embeddings true if the model reuses its embedding)")
        out["output_layer.weight"] = _resize_rows(get("lm_head.weight", (arch.hf_vocab_size, h)), vocab_rows)
    unknown = sorted(k for k in set(ckpt.weight_map) - used if not k.endswith(_IGNORED_SUFFIXES))
    if unknown:
        shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise ConversionError(f"{index}: {len(unknown)} tensor(s) the {arch.model_type} mapping does not know: {shown}")
    return out


def _resize_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` ``[V, h]`` -> ``[rows, h]``: zero rows appended, or rows past ``rows`` dropped."""
    import torch

    if rows == t.shape[0]:
        return t  # a tensor read from its file, held nowhere else: no copy needed
    if rows < t.shape[0]:
        return t[:rows].clone()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
