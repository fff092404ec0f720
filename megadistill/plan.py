"""``megadistill plan``: what a run will need per rank, computed from its config before launch.

Arithmetic on the config alone (no model is built, megatron-core is not imported, no GPU is needed):
parameter counts exactly as megatron-core's ``GPTModel`` lays the architecture out, memory per rank by pipeline stage (parameters,
gradients, optimizer state, activations, logits) for the student and the frozen teacher, the
teacher's FLOP overhead, tokens per step, and for offline and recording runs the logits store's size
from its on-disk layout (``megadistill/store/FORMAT.md``). :func:`make_plan` computes a
:class:`Plan`; :func:`report` renders it as text.

What is not counted (so a rank needs some head room above the figures): the CUDA context and
library workspaces (typically 0.5-2 GiB per GPU), allocator fragmentation, communication buffers,
transient copies (the output layer's ``[s, b, v/tp]`` logits exist twice for a moment; a weight's
gradient exists once before it is added into the gradient buffer) and the data loader.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megadistill.config import ConfigError, ModelConfig, RunConfig, model_parallel_size, run_vocab_size

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of weights and activations, by ``ModelConfig.precision``."""

GiB = 1024**3


# --------------------------------------------------------------------------- parameters


def _widths(m: ModelConfig) -> dict:
    """The tensor widths megatron-core derives from a ``ModelConfig``: head dim, key/value groups,
    the MLP's hidden size and the width of its first linear layer (doubled for SwiGLU's gate)."""
    heads = m.num_attention_heads
    head_dim = m.hidden_size // heads
    groups = m.num_query_groups or heads
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    return {"head_dim": head_dim, "groups": groups, "kv": groups * head_dim, "ffn": ffn,
            "fc1": 2 * ffn if m.activation == "swiglu" else ffn}


def layer_parameters(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank.

    Column-parallel weights (QKV, fc1) and their biases are split over TP; row-parallel weights
    (attention projection, fc2) are split, their biases are not (each rank adds the full bias after
    the all-reduce); norms are replicated. QKV is ``h x (h + 2·groups·head_dim)`` (GQA shrinks K, V).
    """
    h, w = m.hidden_size, _widths(m)
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # LayerNorm has a bias, RMSNorm none
    qkv_out = h + 2 * w["kv"]
    qkv = h * qkv_out // tp + (qkv_out // tp if (m.add_bias_linear or m.add_qkv_bias) else 0)
    proj = h * h // tp + (h if m.add_bias_linear else 0)
    fc1 = h * w["fc1"] // tp + (w["fc1"] // tp if m.add_bias_linear else 0)
    fc2 = w["ffn"] * h // tp + (h if m.add_bias_linear else 0)
    return 2 * norm + qkv + proj + fc1 + fc2


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


# --------------------------------------------------------------------------- activations


def layer_activation_bytes(m: ModelConfig, seq: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                           element_bytes: int = 2) -> int:
    """Bytes one transformer layer keeps for its backward pass, per micro-batch (no recomputation).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): a
    GPT layer with 16-bit activations, GeLU, a 4h MLP, multi-head attention and dropout stores
    ``s·b·h·(34 + 5·a·s/h)`` bytes at TP = 1, ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` at TP = t, and
    ``s·b·h/t·(34 + 5·a·s/h)`` with sequence parallelism. Term by term (e = bytes per element of
    the activations, 1-byte dropout masks), which is what this sums, so that the architecture
    options change the right terms:

    * attention: norm input e·sbh, QKV input e·sbh, Q and K after RoPE e·sb(h + kv)/t, softmax
      output e·a·s²b/t, V e·sb·kv/t, projection input e·sbh/t; with attention dropout its mask
      a·s²b/t and output e·a·s²b/t; with hidden dropout its mask sbh;
    * MLP: norm input e·sbh, fc1 input e·sbh, activation input e·sb·fc1/t (fc1 = 2·ffn for SwiGLU),
      fc2 input e·sb·ffn/t; with hidden dropout its mask sbh.

    At e = 2, dropout on, GeLU, ffn = 4h and kv = h this is exactly Korthikanti's formula. The
    replicated terms (norm inputs, QKV/fc1 inputs, masks) are divided by t only with sequence
    parallelism. Softmax in fp32 for half inputs, the mask and RoPE tables are not counted.
    """
    s, b, h, e = seq, micro_batch, m.hidden_size, element_bytes
    w, t = _widths(m), tp
    heads = m.num_attention_heads
    sbh = s * b * h
    rep = sbh / t if sequence_parallel else sbh  # tensors every TP rank holds whole without SP
    hidden_mask = rep if m.hidden_dropout > 0 else 0
    scores = heads * s * s * b / t
    attention = (2 * e * rep + e * s * b * (h + w["kv"]) / t + e * scores + e * s * b * w["kv"] / t + e * sbh / t
                 + hidden_mask + ((1 + e) * scores if m.attention_dropout > 0 else 0))
    mlp = 2 * e * rep + e * s * b * (w["fc1"] + w["ffn"]) / t + hidden_mask
    return int(attention + mlp)


def attention_score_bytes(m: ModelConfig, seq: int, micro_batch: int, tp: int = 1, element_bytes: int = 2) -> int:
    """The part of :func:`layer_activation_bytes` that grows with s²: softmax output, and with
    attention dropout its mask and output (``(e or 2e + 1)·a·s²·b/t``)."""
    e = element_bytes
    per = (2 * e + 1) if m.attention_dropout > 0 else e
    return int(per * m.num_attention_heads * seq * seq * micro_batch / tp)


def korthikanti_bytes(m: ModelConfig, seq: int, micro_batch: int) -> int:
    """The paper's closed form at TP = 1, 16-bit: ``s·b·h·(34 + 5·a·s/h)`` (for tests and docs)."""
    h = m.hidden_size
    return int(seq * micro_batch * h * (34 + 5 * m.num_attention_heads * seq / h))


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once: 1 without pipelining (each micro-batch's
    backward runs before the next forward); under 1F1B stage r runs ``pp - r`` forwards before its
    first backward (at most the step's micro-batches), so the first stage holds ``pp``."""
    return 1 if pp == 1 else min(pp - stage, micro_batches)


# --------------------------------------------------------------------------- memory per rank


@dataclass
class RankMemory:
    """One model's memory on one rank (bytes), by kind."""

    role: str
    """student or teacher."""
    precision: str
    """Weights and activations: fp32, bf16 or fp16."""
    parameters: int
    """Parameters this rank holds (before any ZeRO-3 partitioning)."""
    param_bytes: int = 0
    """Weights (model precision; ZeRO-3: this rank's partition)."""
    grad_bytes: int = 0
    """Gradient buffers."""
    optimizer_bytes: int = 0
    """fp32 main weights (half precision), Adam moments, optimizer-side gradient partitions."""
    activation_bytes: int = 0
    """Saved for backward (student) or the forward's working set (teacher), all in-flight micro-batches."""
    logits_bytes: int = 0
    """Last stage: the ``[s, b, v/tp]`` logits of a micro-batch (teacher: also offline targets)."""
    score_bytes: int = 0
    """Of ``activation_bytes``: the ``a·s²·b/t`` attention probabilities, which fused (flash)
    attention does not store (Transformer Engine on a GPU)."""

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes + self.logits_bytes

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer state: what does not depend on the batch."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def student_precision(cfg: RunConfig) -> str:
    """``model.precision``; null is fp32 (as ``megadistill.megatron.gpt.precision``)."""
    return cfg.model.precision or "fp32"


def teacher_precision(cfg: RunConfig) -> str:
    """``teacher.model.precision``; null is bf16 on a GPU (``megadistill.megatron.gpt.precision``:
    a plan is for GPU ranks; on CPU a null teacher runs in fp32)."""
    return cfg.teacher.model.precision or "bf16"


def optimizer_state_split(cfg: RunConfig, dp: int) -> tuple[float, float, float, str]:
    """Bytes per parameter ``(weights, gradients, optimizer)`` of the student on one rank, and a
    one-line description.

    megatron (``megadistill.megatron.backend``): weights in the model precision; gradients in DDP's
    fp32 buffer (``grad_reduce_in_fp32``), never sharded; Adam's two fp32 moments, plus fp32 main
    weights for bf16/fp16 (Megatron's mixed-precision optimizer; an fp32 model's weights are their
    own main weights), divided by DP with ``parallel.use_distributed_optimizer`` (ZeRO-1).

    deepspeed (ZeRO paper accounting, Rajbhandari et al. 2020): weights and gradients in the model
    precision, the optimizer's fp32 weight partition, both moments and the fp32 gradient partition
    its step reads (16 bytes) over DP; stage 2 also shards gradients, stage 3 weights too.
    """
    p = student_precision(cfg)
    e = BYTES[p]
    if cfg.optimizer.backend == "deepspeed":
        z = cfg.deepspeed.zero_stage
        weights = e / dp if z >= 3 else e
        grads = e / dp if z >= 2 else e
        what = (f"DeepSpeed ZeRO-{z}, DP {dp}: {p} weights{' (sharded)' if z >= 3 else ''}, {p} gradients"
                f"{' (sharded)' if z >= 2 else ''}, fp32 master weights + Adam moments + fp32 gradient partition over DP")
        return weights, grads, 16 / dp, what
    shard = cfg.parallel.use_distributed_optimizer
    opt = (8 if p == "fp32" else 12) / (dp if shard else 1)
    what = "Adam moments" if p == "fp32" else "fp32 main weights + Adam moments"
    return e, 4, opt, (f"Megatron DDP{' + distributed optimizer (ZeRO-1)' if shard else ''}, DP {dp}: {p} weights, "
                       f"fp32 gradient buffer, {what}{' over DP' if shard else ''}")


def _last_stage_extra_activations(m: ModelConfig, s: int, b: int, e: int) -> int:
    """Last stage, beyond its layers: the final norm's and the output layer's inputs (e·sbh each)."""
    return 2 * e * s * b * m.hidden_size


def student_memory(cfg: RunConfig, vocab: int, dp: int, stage: int) -> RankMemory:
    """The student's memory on a rank of pipeline stage ``stage`` at data-parallel size ``dp``.

    Activations: :func:`layer_activation_bytes` x layers of the stage x in-flight micro-batches; the
    first stage adds the embedding's dropout mask (hidden dropout), the last its final norm and
    output layer inputs and the logits ``e·s·b·v/tp`` (one micro-batch: the last stage runs each
    backward right after its forward). The KD/LM loss works in place on the logits
    (``megadistill.megatron.loss``), in chunks of fp32: nothing the size of the logits is added."""
    par, d = cfg.parallel, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    m = cfg.model
    p = student_precision(cfg)
    e = BYTES[p]
    n = stage_parameters(m, vocab, tp, pp, stage)
    wb, gb, ob, _ = optimizer_state_split(cfg, dp)
    micro_batches = d.global_batch_size // (d.micro_batch_size * dp)
    s, b = d.seq_length, d.micro_batch_size
    per_mb = m.num_layers // pp * layer_activation_bytes(m, s, b, tp, par.sequence_parallel, e)
    if stage == 0 and m.hidden_dropout > 0:
        per_mb += s * b * m.hidden_size
    flight = in_flight_micro_batches(pp, stage, micro_batches)
    act = per_mb * flight
    scores = m.num_layers // pp * attention_score_bytes(m, s, b, tp, e) * flight
    logits = 0
    if stage == pp - 1:
        act += _last_stage_extra_activations(m, s, b, e)
        logits = e * s * b * vocab // tp
    return RankMemory("student", p, n, int(n * wb), int(n * gb), int(n * ob), int(act), int(logits), scores)


def _teacher_forward_bytes(m: ModelConfig, s: int, b: int, tp: int, e: int) -> int:
    """Peak working set of one teacher layer's forward without autograd: the residual stream and a
    norm output (e·2sbh) plus the larger of attention (QKV output, then scores and probabilities
    ``2·a·s²b/t``) and the MLP (fc1 output and activation output)."""
    w, h = _widths(m), m.hidden_size
    attention = e * s * b * (h + 2 * w["kv"]) / tp + 2 * e * m.num_attention_heads * s * s * b / tp
    mlp = e * s * b * (w["fc1"] + w["ffn"]) / tp
    return int(2 * e * s * b * h + max(attention, mlp))


def teacher_memory(cfg: RunConfig, vocab: int, dp: int, stage: int, store_k: Optional[int] = None) -> Optional[RankMemory]:
    """The teacher's memory on a rank of stage ``stage``, or None when the run has no teacher.

    Online: frozen weights in the teacher's precision (no gradients, no optimizer state: it is never
    handed to an optimizer); its forward's working set (:func:`_teacher_forward_bytes`), on stages
    before the last its hidden states riding the pipeline with the student's (in flight as the
    student's activations are), and on the last stage its logits ``e·s·b·v/tp``, kept until the KD
    loss's backward. Offline: no weights; the sparse targets of the micro-batch in use and the two
    the reader prefetches, ``b·s·k`` ids (int64) and log-probs (fp32) each, ``k`` the store's ids per
    position (``store_k``)."""
    t = cfg.teacher
    par, d = cfg.parallel, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    s, b = d.seq_length, d.micro_batch_size
    last = stage == pp - 1
    if t.mode == "offline":
        k = store_k or 0
        logits = 3 * b * s * (k * 12 + 4) if last else 0
        return RankMemory("teacher", "offline store", 0, logits_bytes=logits)
    if t.mode != "online":
        return None
    m = t.model
    p = teacher_precision(cfg)
    e = BYTES[p]
    n = stage_parameters(m, vocab, tp, pp, stage)
    micro_batches = d.global_batch_size // (d.micro_batch_size * dp)
    act = _teacher_forward_bytes(m, s, b, tp, e)
    if not last:
        act += e * s * b * m.hidden_size * in_flight_micro_batches(pp, stage, micro_batches)
    logits = e * s * b * vocab // tp if last else 0
    return RankMemory("teacher", p, n, n * e, 0, 0, int(act), int(logits))


# --------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(m: ModelConfig, vocab: int, seq: int) -> int:
    """Forward FLOPs per token: 2 per weight of every matrix multiply (QKV, projection, fc1, fc2,
    output layer; norms, biases and the embedding lookup are negligible) plus attention's QKᵀ and
    AV, ``2·2·s·h`` per layer (counted over the full square, as Megatron-LM does)."""
    h, w = m.hidden_size, _widths(m)
    matmul = h * (h + 2 * w["kv"]) + h * h + h * w["fc1"] + w["ffn"] * h
    return 2 * (m.num_layers * matmul + vocab * h) + 4 * m.num_layers * seq * h


def teacher_flop_overhead(cfg: RunConfig, vocab: int) -> float:
    """Step FLOPs relative to training the student alone: ``1 + F_t / (3·F_s)`` (training costs a
    forward and a backward of twice its FLOPs, the teacher a forward). Offline and no teacher: 1."""
    if cfg.teacher.mode != "online":
        return 1.0
    s = cfg.data.seq_length
    return 1.0 + forward_flops_per_token(cfg.teacher.model, vocab, s) / (3 * forward_flops_per_token(cfg.model, vocab, s))


# --------------------------------------------------------------------------- logits store


@dataclass
class StoreSettings:
    """How a store is (to be) encoded: precompute-logits' flags, record_logits' keys or a manifest."""

    kind: str = "top_p_k"
    logprob_dtype: str = "fp16"
    draws: int = 12
    compression: Optional[str] = None
    samples_per_shard: int = 1024
    top_p: float = 1.0
    top_k: Optional[int] = None
    source: str = "precompute-logits defaults"


@dataclass
class StoreEstimate:
    """The predicted size of a logits store."""

    path: str
    settings: StoreSettings
    num_samples: int
    num_shards: int
    ids_per_position: int
    bytes: int
    exact: bool
    """True when the data cannot change the size (every position keeps the same number of ids)."""
    notes: list = field(default_factory=list)
    measured_bytes: Optional[int] = None
    """total_bytes of an existing store's manifest."""


def _shard_header_bytes(kind: str, first: int, n: int, seq: int, vocab: int, logprob_dtype: Optional[str],
                        count_str: str, compression: Optional[str], draws: Optional[int]) -> int:
    """Bytes before a shard's first section: magic, uint32 length and the space-padded JSON header,
    whose room is reserved with 16-digit offsets (``megadistill.store.format._lay_out``), padded to 8."""
    from megadistill.store.format import MAGIC, RESIDUAL_DTYPES, chunked_sections, count_dtype, id_bits

    rskd = kind == "rskd"
    lpd = None if rskd else logprob_dtype
    names = chunked_sections(kind, lpd)
    header = {
        "format_version": 2, "kind": kind, "first_sample": first, "num_samples": n, "seq_length": seq,
        "vocab_size": vocab, "id_bits": id_bits(vocab), "logprob_dtype": lpd,
        "residual_dtype": None if rskd else RESIDUAL_DTYPES[lpd], "count_dtype": count_str,
        "compression": compression, "compressed": [k for k in names if k != "ids"] if compression else [],
        "chunked": list(names),
        "sections": {k: [10**15, 10**15] for k in ("sample_hash", "chunk_offsets") + names},
    }
    if rskd:
        header.update(num_draws=draws, draw_dtype=count_dtype(draws).str)
    room = len(json.dumps(header, sort_keys=True)) + 8
    start = len(MAGIC) + 4 + room
    return start + (-start) % 8


def shard_bytes(kind: str, first: int, n: int, seq: int, vocab: int, per_position: int,
                logprob_dtype: Optional[str] = "fp16", draws: Optional[int] = None,
                compression: Optional[str] = None) -> int:
    """Bytes of one uncompressed version-2 shard of ``n`` samples whose every position holds
    ``per_position`` ids (``FORMAT.md``, "Shard layout"): header; ``sample_hash`` 16·n;
    ``chunk_offsets`` 8·(n+1) per chunked section; per sample ``counts`` s·count_dtype, ``residual``
    s·(2 or 4), ``ids`` ceil(s·k·id_bits/8), ``logprobs`` s·k·(2 or 4), or for qlog one byte per
    entry but each position's first and no ``logprob_overflow`` (gaps >= 255 steps, rare: 4 bytes
    each); RS-KD ``draws`` s·k·draw_dtype instead of residual and log-probs. Sections 8-aligned.
    With zstd the result is the uncompressed size, an upper bound in practice."""
    from megadistill.store.format import LOGPROB_DTYPES, QLOG_STEP, RESIDUAL_DTYPES, chunked_sections, count_dtype, id_bits

    def pad(x: int) -> int:
        return x + (-x) % 8

    bits = id_bits(vocab)
    cdt = count_dtype(per_position)
    entries = seq * per_position
    lpd = None if kind == "rskd" else logprob_dtype
    names = chunked_sections(kind, lpd)
    size = _shard_header_bytes(kind, first, n, seq, vocab, lpd, cdt.str, compression, draws)
    size += pad(16 * n) + pad(8 * len(names) * (n + 1))
    sections = {"counts": seq * cdt.itemsize, "ids": (entries * bits + 7) // 8}
    if kind == "rskd":
        sections["draws"] = entries * count_dtype(draws).itemsize
    else:
        sections["residual"] = seq * (2 if RESIDUAL_DTYPES[lpd] == "fp16" else 4)
        sections["logprobs"] = entries - seq if lpd in QLOG_STEP else entries * LOGPROB_DTYPES[lpd].itemsize
        if lpd in QLOG_STEP:
            sections["logprob_overflow"] = 0
    return size + sum(pad(n * sections[k]) for k in names)


def store_settings(cfg: RunConfig, *, kind: Optional[str] = None, logprob_dtype: Optional[str] = None,
                   draws: Optional[int] = None, zstd: Optional[bool] = None,
                   samples_per_shard: Optional[int] = None) -> Optional[tuple[str, StoreSettings]]:
    """The store the run reads (teacher.mode offline: ``teacher.store``) or records
    (``record_logits.store``), and its encoding: a finished store's manifest if there is one, else
    ``record_logits.*``, else precompute-logits' flags given here (its defaults when None);
    top-p/top-k from ``kd.*`` (read) or ``record_logits.*`` (recorded). None: the run has no store."""
    from megadistill.store.format import DEFAULT_SAMPLES_PER_SHARD, MANIFEST

    if cfg.teacher.mode == "offline" and cfg.teacher.store:
        path = cfg.teacher.store
        st = StoreSettings(kind=kind or "top_p_k", logprob_dtype=logprob_dtype or "fp16", draws=draws or 12,
                           compression="zstd" if zstd else None,
                           samples_per_shard=samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
                           top_p=cfg.kd.top_p, top_k=cfg.kd.top_k,
                           source="precompute-logits flags" if any(x is not None for x in (kind, logprob_dtype, draws, zstd, samples_per_shard))
                           else "precompute-logits defaults")
    elif cfg.record_logits.store:
        r = cfg.record_logits
        path = r.store
        st = StoreSettings(kind=r.kind, logprob_dtype=r.logprob_dtype, draws=r.draws, compression=r.compression,
                           samples_per_shard=r.samples_per_shard, top_p=r.top_p, top_k=r.top_k, source="record_logits")
    else:
        return None
    manifest = Path(path) / MANIFEST
    if manifest.is_file():
        try:
            mf = json.loads(manifest.read_text())
            enc = mf["encoding"]
            st.kind, st.compression = mf["kind"], enc.get("compression")
            st.samples_per_shard = mf["samples_per_shard"]
            if st.kind == "rskd":
                st.draws = mf["sampling"]["draws"]
            else:
                st.logprob_dtype = enc["logprob_dtype"]
                st.top_p, st.top_k = mf["truncation"]["top_p"], mf["truncation"]["top_k"]
            st.source = f"the manifest of {path}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable manifest is preflight's and store verify's business; plan from the config
    return path, st


def store_estimate(cfg: RunConfig, vocab: int, path: str, st: StoreSettings) -> StoreEstimate:
    """The store's size for ``train_steps x global_batch_size`` samples of ``seq_length`` tokens.

    Ids per position: RS-KD keeps the distinct ids among its N draws (at most N; exactly 1 at
    N = 1); top-p-k keeps every id of the (padded) vocabulary without truncation, else at most
    top_k, or at most the vocabulary when only top_p truncates; a top_p < 1 keeps fewer on
    confident positions, and ids tied with the last kept one are kept (rare with fp32 logits). So
    the figure is exact when the count cannot vary (no truncation; top_p = 1 with top_k; RS-KD with
    N = 1) and an upper bound otherwise; with zstd it is the uncompressed size."""
    from megadistill.store.writer import shard_ranges

    d = cfg.data
    num = cfg.training.train_steps * d.global_batch_size
    notes = []
    if st.kind == "rskd":
        k, exact = st.draws, st.draws == 1
        if not exact:
            notes.append(f"upper bound: every position's {st.draws} draws assumed distinct (FORMAT.md's benchmark: "
                         "7 distinct ids of 12 draws)")
    elif st.top_k is None and st.top_p >= 1.0:
        k, exact = vocab, True
    elif st.top_k is None:
        k, exact = vocab, False
        notes.append(f"upper bound: top_p {st.top_p} without top_k can keep the whole vocabulary at a flat position")
    else:
        k = min(st.top_k, vocab)
        exact = st.top_p >= 1.0
        if not exact:
            notes.append(f"upper bound: top_k {k} ids at every position (top_p {st.top_p} keeps fewer where the teacher is confident)")
    if st.compression:
        exact = False
        notes.append(f"{st.compression}: the uncompressed size (FORMAT.md's benchmark compresses to 0.7-0.8 of it)")
    if st.kind != "rskd" and st.logprob_dtype.startswith("qlog"):
        notes.append("qlog: gaps of 255 grid steps or more add 4 bytes each (not counted; rare)")
    total = sum(shard_bytes(st.kind, first, n, d.seq_length, vocab, k, st.logprob_dtype, st.draws, st.compression)
                for first, n in shard_ranges(num, st.samples_per_shard))
    measured = None
    mf = Path(path) / "manifest.json"
    if mf.is_file():
        try:
            measured = int(json.loads(mf.read_text())["total_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            measured = None
    return StoreEstimate(path, st, num, math.ceil(num / st.samples_per_shard), k, total, exact, notes, measured)


# --------------------------------------------------------------------------- the plan


@dataclass
class StagePlan:
    """Memory on one rank of a pipeline stage (every TP and DP rank of a stage holds the same)."""

    stage: int
    student: RankMemory
    teacher: Optional[RankMemory]

    @property
    def total(self) -> int:
        return self.student.total + (self.teacher.total if self.teacher else 0)


@dataclass
class Plan:
    """What ``megadistill plan`` reports for one run on ``world_size`` ranks."""

    world_size: int
    tp: int
    pp: int
    dp: int
    vocab: int
    vocab_note: str
    student_parameters: int
    teacher_parameters: Optional[int]
    optimizer: str
    stages: list
    flop_overhead: float
    tokens_per_step: int
    seq_length: int
    micro_batches: int
    flop_note: str = ""
    store: Optional[StoreEstimate] = None
    gpu_memory: Optional[int] = None
    warnings: list = field(default_factory=list)


def tokenizer_vocab(cfg: RunConfig) -> tuple[int, str]:
    """The tokenizer's vocabulary size and where it came from: the sentencepiece model
    (``data.tokenizer_model``, if the file is here), else ``data.vocab_size`` (a tokenizer to be
    trained, or a model file only the cluster has)."""
    tok = cfg.data.tokenizer_model
    if tok is not None and Path(tok).is_file():
        from megadistill.preflight import tokenizer_vocab_size

        return tokenizer_vocab_size(cfg), f"from {tok}"
    if tok is not None:
        return cfg.data.vocab_size, f"data.vocab_size (the tokenizer {tok} is not here)"
    return cfg.data.vocab_size, "data.vocab_size (tokenizer to be trained)"


def make_plan(cfg: RunConfig, world_size: int, gpu_memory: Optional[int] = None, tokenizer_vocab_size: Optional[int] = None,
              **store_flags) -> Plan:
    """The plan of ``cfg`` (validated for ``world_size``) on ``world_size`` ranks; ``gpu_memory``
    (bytes) adds a warning for every stage whose ranks would not fit. ``store_flags`` are
    precompute-logits' (:func:`store_settings`)."""
    par, d = cfg.parallel, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world_size % model_parallel_size(cfg):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
                          f"parallel.pipeline_model_parallel_size = {tp} x {pp}")
    dp = world_size // (tp * pp)
    if tokenizer_vocab_size is None:
        raw, note = tokenizer_vocab(cfg)
    else:
        raw, note = tokenizer_vocab_size, "given"
    vocab = run_vocab_size(cfg, raw)
    note = f"{raw} {note}, padded to {vocab}"
    found = store_settings(cfg, **store_flags)
    store = store_estimate(cfg, vocab, *found) if found else None
    offline_k = store.ids_per_position if store and cfg.teacher.mode == "offline" else None
    stages = [StagePlan(r, student_memory(cfg, vocab, dp, r), teacher_memory(cfg, vocab, dp, r, offline_k)) for r in range(pp)]
    online = cfg.teacher.mode == "online"
    plan = Plan(
        world_size=world_size, tp=tp, pp=pp, dp=dp, vocab=vocab, vocab_note=note,
        student_parameters=total_parameters(cfg.model, vocab),
        teacher_parameters=total_parameters(cfg.teacher.model, vocab) if online else None,
        optimizer=optimizer_state_split(cfg, dp)[3], stages=stages,
        flop_overhead=teacher_flop_overhead(cfg, vocab), tokens_per_step=d.global_batch_size * d.seq_length,
        seq_length=d.seq_length,
        micro_batches=d.global_batch_size // (d.micro_batch_size * dp), store=store, gpu_memory=gpu_memory,
    )
    from megadistill.schedules import kd_ends_at

    end = kd_ends_at(cfg.kd.alpha, cfg.training.train_steps) if online else None
    if end is not None:
        # SALT (or any α that reaches 0 for good): the teacher is released at that step.
        steps = cfg.training.train_steps
        mean = 1 + (plan.flop_overhead - 1) * end / steps
        plan.flop_note = (f" for steps 0-{end - 1}, then 1 (α stays 0 and the teacher is released): "
                          f"{mean:.3f} over the run's {steps} steps")
    if gpu_memory is not None:
        for st in stages:
            if st.total > gpu_memory:
                plan.warnings.append(f"stage {st.stage}: a rank needs {_gib(st.total)} but --gpu-memory is "
                                     f"{_gib(gpu_memory)}: it will not fit ({_advice(cfg, st)})")
            elif st.total > 0.9 * gpu_memory:
                plan.warnings.append(f"stage {st.stage}: a rank needs {_gib(st.total)} of {_gib(gpu_memory)}: less than 10 % "
                                     "head room for the CUDA context, workspaces and fragmentation")
    return plan


def _advice(cfg: RunConfig, st: StagePlan) -> str:
    """What would shrink the largest share of a stage's memory."""
    batch = st.student.activation_bytes + st.student.logits_bytes + (st.teacher.activation_bytes + st.teacher.logits_bytes
                                                                      if st.teacher else 0)
    if batch > st.total - batch:
        return ("mostly activations: lower data.micro_batch_size, raise parallel.tensor_model_parallel_size "
                "(with parallel.sequence_parallel) or pipeline_model_parallel_size")
    tips = ["raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size"]
    if cfg.optimizer.backend == "megatron" and not cfg.parallel.use_distributed_optimizer:
        tips.append("set parallel.use_distributed_optimizer")
    if cfg.optimizer.backend == "deepspeed" and cfg.deepspeed.zero_stage < 3:
        tips.append(f"raise deepspeed.zero_stage (now {cfg.deepspeed.zero_stage})")
    if student_precision(cfg) == "fp32":
        tips.append("model.precision bf16")
    return "mostly weights and optimizer state: " + ", ".join(tips)


# --------------------------------------------------------------------------- report


def _gib(n: float) -> str:
    """A byte count in GiB, or MiB below 1 GiB (small test runs)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _memory_lines(mem: RankMemory) -> list[str]:
    parts = [("weights", mem.param_bytes), ("grads", mem.grad_bytes), ("optimizer", mem.optimizer_bytes),
             ("activations", mem.activation_bytes),
             ("targets" if mem.precision == "offline store" else "logits", mem.logits_bytes)]
    # Zero terms are left out, but a model's weights and activations are always shown.
    shown = ", ".join(f"{k} {_gib(v)}" for k, v in parts if v or (mem.parameters and k in ("weights", "activations")))
    params = f"{_count(mem.parameters)} params, " if mem.parameters else ""
    return [f"    {mem.role} ({mem.precision}): {params}{shown} = {_gib(mem.total)}"]


def report(plan: Plan, layout: Optional[list] = None) -> list[str]:
    """The plan as lines of text: layout, parameters, memory per stage, FLOPs, tokens, store, warnings.
    ``layout`` replaces the default layout lines (the CLI passes ``megadistill config``'s)."""
    layout = layout or [f"world size {plan.world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}",
                        f"each data-parallel rank runs {plan.micro_batches} micro-batch(es) per step"]
    out = ["layout:", *(f"  {line}" for line in layout),
           f"  vocabulary {plan.vocab_note}",
           "parameters:",
           f"  student {plan.student_parameters:,} ({_count(plan.student_parameters)})"]
    if plan.teacher_parameters is not None:
        out.append(f"  teacher {plan.teacher_parameters:,} ({_count(plan.teacher_parameters)}), frozen: no gradients or optimizer state")
    out += ["memory per rank (no recomputation; CUDA context, workspaces and fragmentation not included):",
            f"  student states: {plan.optimizer}"]
    for st in plan.stages:
        where = "" if plan.pp == 1 else (" (first)" if st.stage == 0 else " (last)" if st.stage == plan.pp - 1 else "")
        out.append(f"  stage {st.stage}{where}: {_gib(st.total)}")
        out += _memory_lines(st.student)
        if st.teacher is not None:
            out += _memory_lines(st.teacher)
    worst = max(plan.stages, key=lambda st: st.student.score_bytes)
    if worst.student.score_bytes > 0.1 * max(1, worst.student.activation_bytes):
        out.append(f"  of the student's activations, {_gib(worst.student.score_bytes)} (stage {worst.stage}) are attention "
                   "probabilities (a·s²·b/t per layer), which fused/flash attention (Transformer Engine) does not store")
    out += ["compute:",
            f"  tokens per step {plan.tokens_per_step:,}",
            f"  teacher FLOP overhead 1 + F_t/(3·F_s) = {plan.flop_overhead:.3f}"
            + (plan.flop_note if plan.teacher_parameters is not None else " (no online teacher)")]
    if plan.store is not None:
        s = plan.store
        st = s.settings
        fmt = f"{st.kind}, " + (f"{st.draws} draws" if st.kind == "rskd" else f"{st.logprob_dtype} log-probs, top_p {st.top_p}, top_k {st.top_k}")
        fmt += f", {st.compression or 'uncompressed'}, {st.samples_per_shard} samples/shard (from {st.source})"
        per_token = s.bytes / max(1, s.num_samples * plan.seq_length)
        out += ["logits store:",
                f"  {s.path}: {fmt}",
                f"  {s.num_samples:,} samples in {s.num_shards} shard(s), {s.ids_per_position} ids/position: "
                f"{'' if s.exact else 'at most '}{_gib(s.bytes)} ({s.bytes:,} bytes, {per_token:.1f} B/token)"]
        out += [f"  {n}" for n in s.notes]
        if s.measured_bytes is not None:
            out.append(f"  the existing store holds {s.measured_bytes:,} bytes")
    for w in plan.warnings:
        out.append(f"warning: {w}")
    return out


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``80GiB``, ``80G``, ``40GB``, ``1.5TiB`` or a byte count -> bytes (G and GiB are binary, GB decimal)."""
    m = _SIZE.fullmatch(text or "")
    if not m:
        raise ConfigError(f"--gpu-memory: {text!r} is not a size such as 80GiB or 40GB")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "B":
        return int(value)
    power = "KMGT".index(unit[0]) + 1
    # "GB" is the decimal unit; "GiB" and a bare "G" (as nvidia-smi and SLURM's --mem mean it) are binary.
    base = 1000 if unit.endswith("B") and len(unit) == 2 else 1024
    return int(value * base**power)


# --------------------------------------------------------------------------- command line


def _plan_command(args) -> int:
    """``megadistill plan``: check the run file for nodes x GPUs per node, then print the plan."""
    from megadistill.config import load_config

    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    world_size = args.nodes * args.gpus_per_node
    # The schema (layout included) for this world size; the run's files only with --check-files
    # (a plan is often made away from the cluster's data and checkpoints).
    cfg = load_config(args.config, args.overrides, world_size=world_size, preflight=args.check_files)
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    plan = make_plan(cfg, world_size, gpu_memory, kind=args.store_format, logprob_dtype=args.logprob_dtype,
                     draws=args.draws, zstd=True if args.zstd else None, samples_per_shard=args.samples_per_shard)
    print(f"{cfg.name}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), backend {cfg.optimizer.backend}, "
          f"teacher {cfg.teacher.mode}")
    from megadistill.cli import _layout_report  # the layout lines megadistill config prints

    origin = f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node}"
    for line in report(plan, _layout_report(cfg, world_size, origin)):
        print(line)
    return 0


def add_commands(sub) -> None:
    """Add ``plan`` to the ``megadistill`` subparsers ``sub``."""
    p = sub.add_parser(
        "plan",
        help="per-rank memory, teacher FLOP overhead, tokens per step and store size of a run, before launch",
        description=(
            "Check a run file's layout for NODES x GPUS_PER_NODE ranks, then print, without a GPU: the parameters "
            "of student and teacher (counted from the architecture), each pipeline stage's memory per rank "
            "(weights, gradients, optimizer state by backend, ZeRO stage and precision; activations without "
            "recomputation; logits), the teacher's FLOP overhead 1 + F_t/(3 F_s), tokens per step and, for offline "
            "or recording runs, the logits store's size. With --gpu-memory, warns for every stage whose ranks do not fit."
        ),
    )
    p.add_argument("config", help="run YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    p.add_argument("--nodes", type=int, required=True, metavar="N")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node, one rank each")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU, e.g. 80GiB or 40GB: warn for ranks that would not fit")
    p.add_argument("--check-files", action="store_true",
                   help="also run the preflight checks of data, tokenizer, teacher checkpoint and store")
    g = p.add_argument_group("logits store (teacher.mode offline; default: the store's manifest if it exists, "
                             "else precompute-logits' defaults)")
    g.add_argument("--store-format", choices=("top_p_k", "rskd"), default=None, help="as precompute-logits --format")
    g.add_argument("--logprob-dtype", choices=("fp16", "fp32", "qlog64", "qlog16"), default=None)
    g.add_argument("--draws", type=int, default=None, metavar="N", help="rskd: samples per position")
    g.add_argument("--zstd", action="store_true", help="the store is zstd-compressed (size shown uncompressed)")
    g.add_argument("--samples-per-shard", type=int, default=None, metavar="N")
    p.set_defaults(fn=_plan_command)
