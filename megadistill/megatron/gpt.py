"""The GPT builder: this rank's pipeline stage of a megatron-core ``GPTModel`` from a ``ModelConfig``.

A ``ModelConfig``'s architecture keys map onto ``TransformerConfig`` / ``GPTModel`` arguments; the
defaults build exactly the model of earlier megadistill versions (LayerNorm, GeLU, multi-head
attention, tied embeddings, RoPE base 10000, biases, local spec on CPU), under the same parameter
names and with the same initialisation, so their checkpoints still load.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``ModelConfig.precision`` -> the dtype of the model's weights and activations."""


def device() -> torch.device:
    """This rank's device: its CUDA device, or the CPU on a machine without one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def precision(model_cfg, cfg, cuda: bool | None = None) -> str:
    """``model_cfg.precision``, or its role's default when null: fp32 for the student; for the
    teacher (``model_cfg is cfg.teacher.model``) bf16 on a GPU and fp32 on CPU (a frozen teacher
    needs no fp32 master weights; CPU bf16 matmuls are slow)."""
    if model_cfg.precision is not None:
        return model_cfg.precision
    if cuda is None:
        cuda = torch.cuda.is_available()
    teacher = getattr(getattr(cfg, "teacher", None), "model", None)
    return "bf16" if cuda and model_cfg is teacher else "fp32"


def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(model_cfg, key: str = "model") -> bool:
    """Whether ``model_cfg.transformer_impl`` picks Transformer Engine's layer spec here: auto does
    when TE is importable and a GPU is present; transformer_engine demands it (ValueError naming
    ``key`` without it)."""
    impl = model_cfg.transformer_impl
    if impl == "local":
        return False
    available = _transformer_engine_importable() and torch.cuda.is_available()
    if impl == "transformer_engine" and not available:
        missing = "Transformer Engine is not installed" if not _transformer_engine_importable() else "no GPU is present"
        raise ValueError(f"{key}.transformer_impl is transformer_engine but {missing}: set {key}.transformer_impl to auto or local")
    return available


def layer_spec(model_cfg, key: str = "model"):
    """The transformer layer spec: Transformer Engine's (fused norms, flash attention) or the local one."""
    if use_transformer_engine(model_cfg, key):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # TE's fused layer-norm-linear modules read config.normalization themselves.
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm)
    return get_gpt_layer_local_spec(normalization=model_cfg.normalization, qk_layernorm=model_cfg.qk_layernorm)


def transformer_config(model_cfg, cfg, dtype: torch.dtype, virtual_pipeline_size: Optional[int] = None) -> TransformerConfig:
    """The megatron-core ``TransformerConfig`` of ``model_cfg`` in run ``cfg`` (parallel layout), in
    ``dtype``; ``virtual_pipeline_size``: model chunks per pipeline rank (the interleaved schedule)."""
    swiglu = model_cfg.activation == "swiglu"
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,  # None: hidden_size / num_attention_heads
        qk_layernorm=model_cfg.qk_layernorm,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.layernorm_epsilon,
        # SwiGLU = silu(gate) * up: megatron-core's gated linear unit over F.silu.
        activation_func=F.silu if swiglu else F.gelu,
        gated_linear_unit=swiglu,
        add_bias_linear=model_cfg.add_bias_linear,
        add_qkv_bias=model_cfg.add_qkv_bias,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        sequence_parallel=cfg.parallel.sequence_parallel,
        # The dtype of stage-to-stage tensors and of the weights; fp16/bf16 flags make attention's
        # softmax run in fp32 and tell megatron-core which half type the model holds.
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def build_gpt(model_cfg, cfg, vocab_size: int, meta: bool = False, vp_stage: Optional[int] = None,
              pg_collection=None) -> GPTModel:
    """This rank's stage of a GPTModel for ``model_cfg`` (a ``ModelConfig``: the student's
    ``cfg.model`` or the teacher's ``cfg.teacher.model``) in run ``cfg`` (its parallel layout and
    sequence length), in the model's :func:`precision`, on :func:`device`. ``vocab_size`` is the
    padded vocabulary; its logits are ``[b, s, vocab_size / tp]`` on the last stage.

    ``vp_stage``: build model chunk ``vp_stage`` of the interleaved schedule's
    ``cfg.parallel.virtual_pipeline_model_parallel_size`` (layers, first and last stage as that
    chunk has them); None: the rank's whole stage, as a teacher always is.

    ``pg_collection``: build in a layout of its own (``megadistill.megatron.layout``; ``cfg.parallel``
    then gives that layout's TP and PP sizes) instead of Megatron's parallel state.

    ``meta``: every tensor on the meta device instead (no storage, no initialisation), for a
    caller that assigns the weights itself (``convert-hf``)."""
    key = "teacher.model" if model_cfg is getattr(getattr(cfg, "teacher", None), "model", None) else "model"
    tp = cfg.parallel.tensor_model_parallel_size
    multiple = model_cfg.make_vocab_size_divisible_by * tp
    if vocab_size % multiple:
        raise ValueError(
            f"vocabulary size {vocab_size} is not a multiple of {key}.make_vocab_size_divisible_by x "
            f"tensor-parallel size = {multiple}"
        )
    dtype = DTYPES[precision(model_cfg, cfg)]
    vpp = None if vp_stage is None else cfg.parallel.virtual_pipeline_model_parallel_size
    config = transformer_config(model_cfg, cfg, dtype, vpp)
    virtual = dict(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if pg_collection is not None:
        stage, stages = pg_collection.pp.rank(), pg_collection.pp.size()
        first, last = stage == 0, stage == stages - 1
    else:
        first = parallel_state.is_pipeline_first_stage(**virtual)
        last = parallel_state.is_pipeline_last_stage(**virtual)
    if meta:
        # megatron-core names the GPU explicitly where one is present, which torch.device("meta")
        # does not override; with CPU initialisation it names no device.
        config.use_cpu_initialization = True
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = GPTModel(
            config,
            layer_spec(model_cfg, key),
            vocab_size=vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings or cfg.data.seq_length,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_percent=model_cfg.rotary_percent,
            rotary_base=model_cfg.rotary_base,
            # megatron-core's Llama 3.x scaling (low/high frequency factors 1 and 4, original context 8192).
            rope_scaling=model_cfg.rope_scaling_factor is not None,
            rope_scaling_factor=model_cfg.rope_scaling_factor or 8.0,
            **({} if vp_stage is None else {"vp_stage": vp_stage}),
            **({} if pg_collection is None else {"pg_collection": pg_collection}),
        )
    # Megatron-core allocates a few modules (the local spec's torch norms) in fp32 whatever
    # params_dtype says; Float16Module would cast a student anyway, a teacher has no such wrapper.
    return model.to(device=torch.device("meta") if meta else device(), dtype=dtype)
