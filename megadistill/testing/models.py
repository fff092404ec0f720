"""Tiny megatron-core GPT models for CPU tests and benchmarks (test-only)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig


def tiny_gpt(
    layers: int,
    hidden: int,
    heads: int,
    vocab: int,
    seq: int,
    ffn: int | None = None,
    init_std: float = 0.2,
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
) -> GPTModel:
    """A GPTModel (local spec, RoPE, tied embeddings, ``dropout`` on hidden states and attention)
    for this rank's TP/PP slice.

    Weights are initialised on CPU from the full master weight, so a given seed gives the same
    model at any TP size. ``init_std`` is larger than Megatron's 0.02 so that untrained logits are
    far from uniform.
    """
    config = TransformerConfig(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn or 2 * hidden,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=init_std,
        use_cpu_initialization=True,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=vocab,
        max_sequence_length=seq,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
