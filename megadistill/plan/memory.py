"""Memory per rank by pipeline stage, for the student and the frozen teacher: parameters,
gradients, optimizer state (by backend, ZeRO stage and precision), activations without
recomputation, and logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megadistill import _compat
from megadistill.config import ModelConfig, RunConfig
from megadistill.plan.parameters import BYTES, _widths, stage_parameters

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
    attention = (2 * e * rep + e * s * b * (w["q"] + w["kv"]) / t + e * scores + e * s * b * w["kv"] / t + e * s * b * w["q"] / t
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


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int, vpp: Optional[int] = None) -> float:
    """Micro-batches whose activations a stage holds at once: 1 without pipelining (each micro-batch's
    backward runs before the next forward); under 1F1B stage r runs ``pp - r`` forwards before its
    first backward (at most the step's micro-batches), so the first stage holds ``pp``. Under the
    interleaved schedule (``vpp`` model chunks per stage, each ``1/vpp`` of its layers) megatron-core
    runs ``2(pp - r - 1) + (vpp - 1)·pp`` chunk forwards before the first backward, one more in the
    steady state: that many ``1/vpp`` shares of a micro-batch (at most the step's ``vpp·M``)."""
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - stage, micro_batches)
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, vpp * micro_batches) / vpp


# --------------------------------------------------------------------------- fixed per process

CPU_PROCESS_BYTES = {"megatron": 394 * 2**20, "deepspeed": 417 * 2**20}
"""Host memory a CPU (gloo) training rank holds whatever its model, by ``optimizer.backend``, with
megatron-core 0.16 (:data:`CPU_PROCESS_BYTES_TRITON` from 0.17 on): the
interpreter with torch, megatron-core and megadistill imported (~360 MiB), the data, and what the
first steps allocate beyond the model's own memory (allocator arenas, autograd and gloo buffers;
DeepSpeed's import and engine with its backend). Stated, not computed: measured as the peak RSS of
a one-rank run of a 0.1 M-parameter model (``tests/plan/test_plan.py`` measures it again) minus its
plan, with torch 2.13.0+cpu, megatron-core 0.16.1, DeepSpeed 0.19.8, Python 3.11 on x86-64 Linux;
other versions and installs differ (a fresh install measured ~100 MiB more). A GPU rank holds it in host memory, not GPU memory: its fixed
GPU part is the CUDA context and library workspaces (:data:`GPU_PROCESS_NOTE`)."""

CPU_PROCESS_BYTES_TRITON = {"megatron": 560 * 2**20, "deepspeed": 585 * 2**20}
"""The same with megatron-core 0.17 or later, whose import brings triton (and more of the library):
measured with 0.19.2 in a fresh install (ci-local: process peaks of 611 and 636 MiB for the
0.1 M-parameter model, its plan 4 MiB), stated at ~50 MiB below that, as installs vary by tens of MiB."""

GPU_PROCESS_NOTE = "the CUDA context and library workspaces, typically 0.5-2 GiB of GPU memory"
"""A GPU rank's fixed part, which depends on the GPU, driver and libraries: not computed."""


def cpu_process_bytes(cfg: RunConfig) -> int:
    """:data:`CPU_PROCESS_BYTES` of the run's backend, for the installed megatron-core."""
    try:
        triton = _compat.imports_triton(_compat.installed_version())
    except _compat.UnknownMegatronVersion:
        triton = False
    return (CPU_PROCESS_BYTES_TRITON if triton else CPU_PROCESS_BYTES)[cfg.optimizer.backend]


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
    holds_targets: bool = False
    """``logits_bytes`` are sparse targets (an offline store's, or a pre-pass teacher's), not logits."""

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
    flight = in_flight_micro_batches(pp, stage, micro_batches, par.virtual_pipeline_model_parallel_size)
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
    attention = e * s * b * (w["q"] + 2 * w["kv"]) / tp + 2 * e * m.num_attention_heads * s * s * b / tp
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
    position (``store_k``). Online with ``teacher.placement: prepass``: the weights and one
    forward's working set as co-located, no hidden states riding the student's pipeline, and on the
    last stage the step's sparse targets, held through the student's schedule: per micro-batch
    ``b·s·k`` ids (int64) and float64 log-probs, a float64 residual and tail per position, ``k``
    the kd's top_k (the vocabulary's shard-free size with top_p alone: an upper bound) or the
    draws. Its logits exist during the pre-pass only, before the student's activations do."""
    t = cfg.teacher
    par, d = cfg.parallel, cfg.data
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    s, b = d.seq_length, d.micro_batch_size
    last = stage == pp - 1
    if t.mode == "offline":
        k = store_k or 0
        logits = 3 * b * s * (k * 12 + 4) if last else 0
        return RankMemory("teacher", "offline store", 0, logits_bytes=logits, holds_targets=True)
    if t.mode != "online":
        return None
    m = t.model
    p = teacher_precision(cfg)
    e = BYTES[p]
    n = stage_parameters(m, vocab, tp, pp, stage)
    micro_batches = d.global_batch_size // (d.micro_batch_size * dp)
    act = _teacher_forward_bytes(m, s, b, tp, e)
    if t.placement == "prepass":
        t_tp, t_pp = t.layout(par)
        if (t_tp, t_pp) != (tp, pp):
            # Its own layout: which teacher stage a rank of this student stage holds depends on the
            # rank; count the largest.
            n = max(stage_parameters(m, vocab, t_tp, t_pp, j) for j in range(t_pp))
            act = _teacher_forward_bytes(m, s, b, t_tp, e)
        k = t.prepass_draws if t.prepass_targets == "rskd" else min(cfg.kd.top_k or vocab, vocab)
        targets = micro_batches * b * s * (16 * k + 16) if last else 0
        return RankMemory("teacher", p, n, n * e, 0, 0, int(act), int(targets), holds_targets=True)
    if not last:
        act += e * s * b * m.hidden_size * in_flight_micro_batches(pp, stage, micro_batches)
    logits = e * s * b * vocab // tp if last else 0
    return RankMemory("teacher", p, n, n * e, 0, 0, int(act), int(logits))


