"""Benchmark: the cost of an online teacher. Student-only training steps vs student + co-located
teacher (KD) steps, side by side in one run, against the FLOP ideal ``1 + F_teacher / (3 F_student)``.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_overhead.py [--steps 10]

Both variants use the same DistillationModel, Megatron DDP and Adam; the student-only step sets the
KD weight to 0, which skips the teacher entirely. Timing: median step time over ``--steps``
interleaved steps after one warm-up step each. CPU, one process (TP=PP=DP=1); one table in fp32
and one in bf16 (``--precision``): the bf16 student in Megatron's Float16Module with fp32 main
parameters in Megatron's optimizer, the frozen teacher cast to bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megadistill.losses import KDLossConfig
from megadistill.megatron import DistillationLoss, DistillationModel, make_forward_step
from megadistill.kd.knobs import KDStep
from megadistill.megatron.training import train_step, wrap_ddp, wrap_half
from megadistill.testing import run_distributed
from megadistill.testing.models import tiny_gpt

VOCAB, SEQ, MBS, MICRO_BATCHES = 2048, 128, 8, 2
STUDENT = dict(layers=3, hidden=192, heads=4)
TEACHER = dict(layers=4, hidden=256, heads=4)


def forward_flops_per_token(layers: int, hidden: int, heads: int, ffn: int | None = None) -> float:
    """Matmul FLOPs of one forward pass per token: QKV/projection/MLP weights, attention scores
    and values over SEQ positions (as computed, unmasked), and the output layer."""
    ffn = ffn or 2 * hidden  # tiny_gpt's default
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * SEQ * hidden
    return layers * per_layer + 2 * hidden * VOCAB


def _worker(steps: int, threads: int, precision: str = "fp32"):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    student = tiny_gpt(**STUDENT, vocab=VOCAB, seq=SEQ, init_std=0.02, dtype=dtype)
    # tiny_gpt leaves the local spec's norms in fp32: cast the whole teacher, as build_gpt does.
    teacher = tiny_gpt(**TEACHER, vocab=VOCAB, seq=SEQ, init_std=0.02, dtype=dtype).to(dtype)
    half = precision != "fp32"
    for m in (student, teacher):
        m.config.bf16 = half  # Float16Module reads it (attention softmax flags stay as tiny_gpt built them)
    distill = DistillationModel(student, teacher)
    model = wrap_half(distill, precision)
    ddp = wrap_ddp(model, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0, bf16=half, params_dtype=dtype), [ddp]
    )
    loss = DistillationLoss(KDLossConfig(top_p=0.95, top_k=50, truncation="ghost"))
    forward_step = make_forward_step(lambda it: next(it), loss)
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(SEQ).expand(MBS, SEQ)

    def batches():
        tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MBS, SEQ + 1), generator=g)
        return iter([(t[:, :-1], t[:, 1:], torch.ones(MBS, SEQ), None, pos) for t in tokens])

    def step(alpha: float) -> float:
        loss.step = knobs = KDStep(alpha=alpha, temperature=1.0)
        distill.teacher_active = knobs.uses_teacher  # "student only" (α = 0): the teacher does not run
        t0 = time.perf_counter()
        train_step(forward_step, batches(), ddp, optimizer, MICRO_BATCHES, SEQ, MBS)
        return time.perf_counter() - t0

    def teacher_forward() -> float:
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        t0 = time.perf_counter()
        for _ in range(MICRO_BATCHES):
            with torch.no_grad():
                teacher(tokens, pos, None)
        return time.perf_counter() - t0

    step(0.0), step(0.5), teacher_forward()  # warm-up
    times = {"student only": [], "student + teacher": [], "teacher forward alone": []}
    for _ in range(steps):
        times["student only"].append(step(0.0))
        times["student + teacher"].append(step(0.5))
        times["teacher forward alone"].append(teacher_forward())
    params = {
        "student": sum(p.numel() for p in student.parameters()),
        "teacher": sum(p.numel() for p in teacher.parameters()),
    }
    return {k: statistics.median(v) for k, v in times.items()}, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    args = ap.parse_args()
    for precision in ("fp32", "bf16") if args.precision == "both" else (args.precision,):
        report(args, precision, *run_distributed(_worker, 1, args.steps, args.threads, precision)[0])


def report(args, precision: str, times: dict, params: dict) -> None:
    f_s = forward_flops_per_token(**STUDENT)
    f_t = forward_flops_per_token(**TEACHER)
    ideal = 1 + f_t / (3 * f_s)
    measured = times["student + teacher"] / times["student only"]
    tokens = MBS * SEQ * MICRO_BATCHES
    print(
        f"\n## {precision}\n\nCPU, {args.threads} threads, 1 process, {precision} (student and teacher); {tokens} tokens/step (micro-batch {MBS} x seq {SEQ} x "
        f"{MICRO_BATCHES}), vocab {VOCAB}; torch {torch.__version__}; median of {args.steps}\n"
    )
    print(f"student {STUDENT}: {params['student'] / 1e6:.2f} M params, {f_s / 1e6:.1f} MFLOP/token forward")
    print(f"teacher {TEACHER}: {params['teacher'] / 1e6:.2f} M params ({params['teacher'] / params['student']:.2f}x), "
          f"{f_t / 1e6:.1f} MFLOP/token forward\n")
    print("| step | time (ms) | tokens/s |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.0f} | {tokens / t:.0f} |")
    print()
    print(f"measured slowdown {measured:.3f}x; FLOP ideal 1 + F_t/(3 F_s) = {ideal:.3f}x; "
          f"measured / ideal = {measured / ideal:.3f} (target <= 1.15)")
    print(f"teacher forward share of the KD step: {times['teacher forward alone'] / times['student + teacher']:.1%}")


if __name__ == "__main__":
    main()
