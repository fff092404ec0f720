"""Benchmark: the Megatron distributed optimizer vs DeepSpeed ZeRO-1/2/3, same KD run side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/backends.py [--steps 3] [--rounds 2]

One student and one online teacher (random weights: the numbers do not depend on them), fp32,
DP=2 on forked gloo ranks, one thread per rank, built and stepped through the ``Backend``
protocol exactly as the training loop does. Each variant runs in fresh rank processes; the
variants take turns, ``--rounds`` times, so that machine noise spreads over all of them.

Measured per rank:

* step time: median over every round's ``--steps`` timed steps (after one warm-up step);
* memory: resident set sizes (``/proc/self/status``) relative to the rank's resident set when
  the worker started (a forked rank starts with the parent's pages mapped: torch, megatron and
  deepspeed imported): the peak while building the backend, the resident set once built, and the
  peak during the training steps (warm-up included; the kernel's high-water mark is reset after
  building through ``/proc/self/clear_refs``), and the resident set after the last step;
* kernel (system) CPU time per timed step (``getrusage``): page faults of large temporary
  buffers, which glibc maps and unmaps afresh every step, show up there;
* resident training state: bytes of this rank's Adam moments (``exp_avg``, ``exp_avg_sq``) and
  of the student parameters it keeps between steps (ZeRO-3 keeps only its partition).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.deepspeed import env  # noqa: E402

env.configure_accelerator()  # in the parent: forked ranks inherit it

import torch  # noqa: E402

from megadistill.config import (  # noqa: E402
    DataConfig,
    DeepSpeedConfig,
    KDConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
)
from megadistill.kd.knobs import KDStep  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

# Short sequences and a student larger than its teacher: the per-rank training state (what ZeRO
# shards) rather than activations should decide the memory.
VOCAB, SEQ, MBS, GLOBAL = 8192, 64, 2, 8  # 2 micro-batches per rank at DP=2
STUDENT = ModelConfig(num_layers=8, hidden_size=768, num_attention_heads=12)
TEACHER = ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8)
VARIANTS = {
    "megatron dist-opt": ("megatron", 1),
    "deepspeed ZeRO-1": ("deepspeed", 1),
    "deepspeed ZeRO-2": ("deepspeed", 2),
    "deepspeed ZeRO-3": ("deepspeed", 3),
}


def _config(backend: str, stage: int, steps: int) -> RunConfig:
    return RunConfig(
        model=STUDENT,
        teacher=TeacherConfig(mode="online", model=TEACHER),
        parallel=ParallelConfig(use_distributed_optimizer=True),
        kd=KDConfig(temperature=1.0),
        optimizer=OptimizerConfig(backend=backend, lr=1e-4, min_lr=1e-5, warmup_fraction=0.0, clip_grad=1.0),
        deepspeed=DeepSpeedConfig(zero_stage=stage),
        data=DataConfig(seq_length=SEQ, micro_batch_size=MBS, global_batch_size=GLOBAL),
        training=TrainingConfig(train_steps=steps + 1),
    )


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _adam_bytes(optimizer) -> int:
    total = 0
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in leaf.optimizer.state.values():
            total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
    return total


def _worker(backend_name: str, stage: int, steps: int) -> dict:
    from megatron.core import parallel_state

    from megadistill.assemble import build_backend
    from megadistill.megatron.online import OnlineTeacher
    from megadistill.megatron.gpt import build_gpt, device

    start_rss = _status_bytes("VmRSS")
    cfg = _config(backend_name, stage, steps)
    teacher = OnlineTeacher(lambda: build_gpt(cfg.teacher.model, cfg, VOCAB))
    backend = build_backend(cfg, VOCAB, teacher)
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    g = torch.Generator().manual_seed(100 + r)
    build_peak, built = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    _reset_peak()

    def batches():
        out = []
        for _ in range(GLOBAL // dp // MBS):
            tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
            out.append({
                "tokens": tokens[:, :-1].to(device()), "labels": tokens[:, 1:].to(device()),
                "loss_mask": torch.ones(MBS, SEQ, device=device()),
                "position_ids": torch.arange(SEQ, device=device()).expand(MBS, SEQ),
                "indices": torch.zeros(MBS, dtype=torch.long),
            })
        return out

    times, sys_seconds = [], 0.0
    for i in range(steps + 1):
        mb = batches()
        torch.distributed.barrier()
        sys0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        backend.train_step(mb, KDStep(alpha=0.5, temperature=cfg.kd.temperature))
        if i:  # the first step is a warm-up (lazy Adam state, ZeRO-3's prefetch trace)
            times.append(time.perf_counter() - t0)
            sys_seconds += resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0
    train_peak, after = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    model = backend.student if hasattr(backend, "student") else backend.model.module.module
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * 4 for p in model.parameters())
    return {
        "times": times,
        "build_peak": build_peak - start_rss,
        "built": built - start_rss,
        "train_peak": train_peak - start_rss,
        "after": after - start_rss,
        "sys_per_step": sys_seconds / steps,
        "adam": _adam_bytes(backend.optimizer),
        "params": params,
        "student_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.teacher.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, in turn")
    args = parser.parse_args()

    results = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (backend, stage) in VARIANTS.items():
            results[name].append(run_distributed(_worker, 2, backend, stage, args.steps))

    first = results["megatron dist-opt"][0][0]
    mb = 2**20
    print(
        f"DP=2 gloo, 1 thread/rank, fp32, torch {torch.__version__}; student {first['student_params'] / 1e6:.2f} M params "
        f"({STUDENT.num_layers} layers, hidden {STUDENT.hidden_size}), online teacher {first['teacher_params'] / 1e6:.2f} M "
        f"({TEACHER.num_layers} layers, hidden {TEACHER.hidden_size}); vocab {VOCAB}, seq {SEQ}, "
        f"{GLOBAL // 2 // MBS} micro-batches of {MBS} per rank; median of {args.rounds} x {args.steps} steps\n"
    )
    print(
        "| backend | step time (s) | x Megatron | sys CPU / step (s) | build peak (MB) | built (MB) "
        "| training peak (MB) | after steps (MB) | Adam state (MB) | student params held (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, rounds in results.items():
        times = [t for ranks in rounds for rank in ranks for t in rank["times"]]
        step = statistics.median(times)
        base = base or step
        keys = ("build_peak", "built", "train_peak", "after", "adam", "params")
        worst = {k: max(rank[k] for ranks in rounds for rank in ranks) for k in keys}
        sys_step = statistics.median(rank["sys_per_step"] for ranks in rounds for rank in ranks)
        print(
            f"| {name} | {step:.2f} | {step / base:.2f} | {sys_step:.2f} | {worst['build_peak'] / mb:.0f} "
            f"| {worst['built'] / mb:.0f} | {worst['train_peak'] / mb:.0f} | {worst['after'] / mb:.0f} "
            f"| {worst['adam'] / mb:.1f} | {worst['params'] / mb:.1f} |"
        )
    print("\nmemory per rank, MB above the rank's resident set at start (the largest over ranks and rounds)")


if __name__ == "__main__":
    main()
