"""Benchmark: the cost of an online teacher. Student-only training steps vs student + co-located
teacher (KD) steps vs student + teacher pre-pass steps (``teacher.placement: prepass``: the teacher
runs forward-only over the step's micro-batches first and hands the loss top-p-k targets), side by
side in one run, against the FLOP ideal ``1 + F_teacher / (3 F_student)``; and the pre-pass targets'
memory per rank (what they hold for the step).

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
from megadistill.store.prepass import PrepassTeacher
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
    kd = KDLossConfig(top_p=0.95, top_k=50, truncation="ghost")
    loss = DistillationLoss(kd)
    forward_step = make_forward_step(lambda it: next(it), loss)
    # The pre-pass source runs the same frozen teacher module by itself.
    prepass = PrepassTeacher(lambda: teacher, kd, SEQ)

    class StudentOfPair:  # the DistillationModel with its teacher off returns (student logits, None)
        def split(self, batch, output):
            return prepass.split(batch, output[0])

    prepass_step = make_forward_step(lambda it: next(it), loss, StudentOfPair())
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(SEQ).expand(MBS, SEQ)
    held = []

    def batches():
        tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MBS, SEQ + 1), generator=g)
        return iter([(t[:, :-1], t[:, 1:], torch.ones(MBS, SEQ), None, pos) for t in tokens])

    def step(alpha: float) -> float:
        loss.step = knobs = KDStep(alpha=alpha, temperature=1.0)
        distill.teacher_active = knobs.uses_teacher  # "student only" (α = 0): the teacher does not run
        t0 = time.perf_counter()
        train_step(forward_step, batches(), ddp, optimizer, MICRO_BATCHES, SEQ, MBS)
        return time.perf_counter() - t0

    def step_prepass() -> float:
        loss.step = knobs = KDStep(alpha=0.5, temperature=1.0)
        distill.teacher_active = False  # the student's schedule runs the student alone
        prepass.set_active(True)
        tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MBS, SEQ + 1), generator=g)
        mbs = [{"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(MBS, SEQ), "position_ids": pos,
                "indices": torch.arange(i * MBS, (i + 1) * MBS)} for i, t in enumerate(tokens)]
        t0 = time.perf_counter()
        prepass.prepare(mbs, knobs)
        train_step(prepass_step, iter(mbs), ddp, optimizer, MICRO_BATCHES, SEQ, MBS)
        elapsed = time.perf_counter() - t0
        held.append(sum(sum(x.nbytes for x in (t.ids, t.logprobs, t.residual) if x is not None)
                        for t in prepass._targets.values()))
        return elapsed

    def teacher_forward() -> float:
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        t0 = time.perf_counter()
        for _ in range(MICRO_BATCHES):
            with torch.no_grad():
                teacher(tokens, pos, None)
        return time.perf_counter() - t0

    step(0.0), step(0.5), step_prepass(), teacher_forward()  # warm-up
    times = {"student only": [], "student + teacher": [], "student + teacher pre-pass": [], "teacher forward alone": []}
    for _ in range(steps):
        times["student only"].append(step(0.0))
        times["student + teacher"].append(step(0.5))
        times["student + teacher pre-pass"].append(step_prepass())
        times["teacher forward alone"].append(teacher_forward())
    params = {
        "student": sum(p.numel() for p in student.parameters()),
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "targets_bytes": max(held),
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
    pre = times["student + teacher pre-pass"] / times["student only"]
    print(f"pre-pass: slowdown {pre:.3f}x, measured / ideal = {pre / ideal:.3f}; {pre / measured:.3f}x the co-located "
          f"step; targets held per rank {params['targets_bytes'] / 2**20:.2f} MiB for the step "
          f"({params['targets_bytes'] / tokens:.0f} B/token: top-0.95-50 ids int64 + float64 log-probs + residual)")


if __name__ == "__main__":
    main()
