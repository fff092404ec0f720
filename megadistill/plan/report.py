"""The plan of a run (:func:`make_plan`) and its text (:func:`report`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megadistill.config import ConfigError, RunConfig, model_parallel_size, run_vocab_size
from megadistill.plan.memory import (
    GPU_PROCESS_NOTE,
    RankMemory,
    cpu_process_bytes,
    optimizer_state_split,
    student_memory,
    student_precision,
    teacher_memory,
)
from megadistill.plan.parameters import GiB, teacher_flop_overhead, total_parameters
from megadistill.schedules import kd_ends_at
from megadistill.store.estimate import StoreEstimate, store_estimate, store_settings

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
    cpu_process_bytes: int = 0
    """The fixed host memory of a CPU (gloo) rank, on top of every stage's figure
    (:data:`megadistill.plan.memory.CPU_PROCESS_BYTES`)."""

    def cpu_rank_total(self, stage: int) -> int:
        """What a CPU rank of pipeline stage ``stage`` holds in all: the stage's figure and the
        process's fixed part (the peak RSS ``tests/plan/test_plan.py`` compares it with)."""
        return self.stages[stage].total + self.cpu_process_bytes


def tokenizer_vocab(cfg: RunConfig) -> tuple[int, str]:
    """The tokenizer's vocabulary size and where it came from: the sentencepiece model
    (``data.tokenizer_model``, if the file is here), else ``data.vocab_size`` (a tokenizer to be
    trained, or a model file only the cluster has)."""
    tok = cfg.data.tokenizer_model
    if tok is not None and Path(tok).is_file():
        # Here, not at the top: the tokenizers import megatron-core (seconds), which a plan needs not.
        from megadistill.data.tokenizer import tokenizer_vocab_size

        return tokenizer_vocab_size(tok, cfg.data.tokenizer_type), f"from {tok}"
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
        cpu_process_bytes=cpu_process_bytes(cfg),
    )
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
             ("targets" if mem.holds_targets else "logits", mem.logits_bytes)]
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
    out += ["  fixed per process, not in the stages' figures:",
            f"    GPU rank: {GPU_PROCESS_NOTE} (not computed)",
            f"    CPU (gloo) rank: {_gib(plan.cpu_process_bytes)} of host memory for torch, megatron-core, the data and "
            "the first steps' buffers (stated: measured with torch 2.13 CPU, megatron-core 0.16, DeepSpeed 0.19)",
            "  a CPU rank in all: " + ", ".join(f"stage {st.stage} {_gib(plan.cpu_rank_total(st.stage))}" for st in plan.stages)]
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


