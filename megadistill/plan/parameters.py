"""Parameter counts and FLOPs of a GPT model, exactly as megatron-core's ``GPTModel`` lays the
architecture out (arithmetic on the config alone: no model is built)."""

from __future__ import annotations

from megadistill.config import ModelConfig, RunConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of weights and activations, by ``ModelConfig.precision``."""

GiB = 1024**3


# --------------------------------------------------------------------------- parameters


def _widths(m: ModelConfig) -> dict:
    """The tensor widths megatron-core derives from a ``ModelConfig``: head dim, key/value groups,
    the MLP's hidden size and the width of its first linear layer (doubled for SwiGLU's gate)."""
    heads = m.num_attention_heads
    head_dim = m.kv_channels or m.hidden_size // heads
    groups = m.num_query_groups or heads
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    return {"head_dim": head_dim, "groups": groups, "q": heads * head_dim, "kv": groups * head_dim, "ffn": ffn,
            "fc1": 2 * ffn if m.activation == "swiglu" else ffn}


def layer_parameters(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank.

    Column-parallel weights (QKV, fc1) and their biases are split over TP; row-parallel weights
    (attention projection, fc2) are split, their biases are not (each rank adds the full bias after
    the all-reduce); norms are replicated. QKV is ``h x (heads·head_dim + 2·groups·head_dim)`` (GQA
    shrinks K, V); query/key norms (``qk_layernorm``) are ``head_dim`` wide each.
    """
    h, w = m.hidden_size, _widths(m)
    per_norm = 2 if m.normalization == "LayerNorm" else 1  # LayerNorm has a bias, RMSNorm none
    norm = h * per_norm
    qk_norms = 2 * w["head_dim"] * per_norm if m.qk_layernorm else 0
    qkv_out = w["q"] + 2 * w["kv"]
    qkv = h * qkv_out // tp + (qkv_out // tp if (m.add_bias_linear or m.add_qkv_bias) else 0)
    proj = w["q"] * h // tp + (h if m.add_bias_linear else 0)
    fc1 = h * w["fc1"] // tp + (w["fc1"] // tp if m.add_bias_linear else 0)
    fc2 = w["ffn"] * h // tp + (h if m.add_bias_linear else 0)
    return 2 * norm + qk_norms + qkv + proj + fc1 + fc2


def stage_parameters(m: ModelConfig, vocab: int, tp: int = 1, pp: int = 1, stage: int = 0) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (of ``pp``) at tensor-parallel size
    ``tp``, for the padded vocabulary ``vocab``.

    The first stage holds the word embedding ``[vocab/tp, h]`` (RoPE has no position weights); the
    last stage the final norm and the output layer ``[vocab/tp, h]`` (no bias) -- its own weight when
    the embeddings are untied, and also when tied with PP > 1, where megatron-core gives the last
    stage a copy of the embedding (kept equal by an all-reduce of their gradients: it has gradients
    and optimizer state like any weight). Tied with PP = 1 the output layer reuses the embedding."""
    first, last = stage == 0, stage == pp - 1
    h = m.hidden_size
    n = m.num_layers // pp * layer_parameters(m, tp)
    embedding = vocab // tp * h
    if first:
        n += embedding
    if last:
        n += h * (2 if m.normalization == "LayerNorm" else 1)
        if m.untie_embeddings_and_output_weights or pp > 1:
            n += embedding
    return n


def total_parameters(m: ModelConfig, vocab: int) -> int:
    """Parameters of the whole model (``sum(p.numel())`` of a TP = PP = 1 ``GPTModel``)."""
    return stage_parameters(m, vocab)


# --------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(m: ModelConfig, vocab: int, seq: int) -> int:
    """Forward FLOPs per token: 2 per weight of every matrix multiply (QKV, projection, fc1, fc2,
    output layer; norms, biases and the embedding lookup are negligible) plus attention's QKᵀ and
    AV, ``2·2·s·h`` per layer (counted over the full square, as Megatron-LM does)."""
    h, w = m.hidden_size, _widths(m)
    matmul = h * (w["q"] + 2 * w["kv"]) + w["q"] * h + h * w["fc1"] + w["ffn"] * h
    return 2 * (m.num_layers * matmul + vocab * h) + 4 * m.num_layers * seq * w["q"]


def teacher_flop_overhead(cfg: RunConfig, vocab: int) -> float:
    """Step FLOPs relative to training the student alone: ``1 + F_t / (3·F_s)`` (training costs a
    forward and a backward of twice its FLOPs, the teacher a forward). Offline and no teacher: 1."""
    if cfg.teacher.mode != "online":
        return 1.0
    s = cfg.data.seq_length
    return 1.0 + forward_flops_per_token(cfg.teacher.model, vocab, s) / (3 * forward_flops_per_token(cfg.model, vocab, s))


