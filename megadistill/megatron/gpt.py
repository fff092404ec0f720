"""The GPT builder: this rank's pipeline stage of a megatron-core ``GPTModel`` from a ``ModelConfig``."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig


def device() -> torch.device:
    """This rank's device: its CUDA device, or the CPU on a machine without one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_gpt(model_cfg, cfg, vocab_size: int) -> GPTModel:
    """This rank's stage of a GPTModel (local spec, RoPE, tied embeddings) for ``model_cfg`` (a
    ``ModelConfig``) in run ``cfg`` (its parallel layout and sequence length), on :func:`device`."""
    config = TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=vocab_size,
        max_sequence_length=cfg.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    return model.to(device())
