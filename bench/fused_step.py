"""Benchmark: the step-level effect of ``kd.fused_output_layer`` -- the largest micro-batch whose full
training step fits a fixed memory budget, fused vs unfused, for the demo's student and its online
teacher at vocabulary 32,000.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fused_step.py [--budget-mib auto --mbs 1 2 4 8 16 --steps 6 --warmup 3]

Models: the demo's student (3 layers, hidden 192, 4 heads) and its PD teacher (4 layers, hidden
256, 4 heads), ``megadistill.megatron.gpt.build_gpt`` from ``ModelConfig`` s (tied embeddings, RoPE,
fp32), sequence length 128 (the demo's), vocabulary 32,000, random weights and tokens. One
training step as the Megatron backend runs it: ``DistillationModel`` (online teacher, frozen) in
Megatron's DDP, ``train_step`` (schedule: forward, loss, backward; ``finalize_model_grads``) and
Megatron's Adam, one micro-batch per step; the KD loss is the demo's PD* objective with a constant
α = 0.5 (forward KL, τ = 1, top-0.95-50, renormalised). ``fused`` switches the model over with
``fuse_output_layer`` (what ``kd.fused_output_layer: true`` does in ``MegatronBackend``); ``unfused``
hands the loss ``[b, s, V]`` logits of both models.

Each (variant, micro-batch size) runs in a fresh forked process (``run_distributed``, 1 rank).
Peak: the rise of the process's peak resident set (Linux VmHWM, reset before each step) above its
resident set once the models, DDP, the optimizer and the batches exist, max over ``--steps`` steps
(the first also allocates Adam's state, which stays resident for the later ones). Time per
token: the fastest step after ``--warmup`` untimed ones (the first steps run well slower while the
allocator first maps its big buffers), ÷ (micro-batch × 128). A variant stops at the first
micro-batch size over the budget. ``--budget-mib auto`` (the default) takes the unfused peak at
micro-batch 4, rounded up to a multiple of 16 MiB, so unfused fits up to 4 by construction.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig, get_megatron_optimizer

from megadistill.config import DataConfig, KDConfig, ModelConfig, RunConfig, TeacherConfig
from megadistill.kd.knobs import KDStep
from megadistill.megatron import DistillationLoss, DistillationModel, make_forward_step
from megadistill.megatron.gpt import build_gpt
from megadistill.megatron.model import fuse_output_layer
from megadistill.megatron.training import train_step, wrap_ddp
from megadistill.schedules import AlphaSchedule
from megadistill.testing import run_distributed

VOCAB, SEQ = 32000, 128
STUDENT = ModelConfig(num_layers=3, hidden_size=192, num_attention_heads=4)   # DemoScale DEFAULT.student
TEACHER = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4)   # DemoScale DEFAULT.teacher
# The demo's PD* objective (megadistill.demo.runs.PD_STAR) with a constant α = 0.5.
KD = KDConfig(loss="forward_kl", temperature=1.0, top_p=0.95, top_k=50, truncation="renormalize",
              alpha=AlphaSchedule(kind="constant", alpha_max=0.5))
VARIANTS = ("unfused", "fused")


def _mem_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(variant: str, mbs: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = RunConfig(name="fused_step", output_dir="/tmp/unused", model=STUDENT,
                    teacher=TeacherConfig(mode="online", model=TEACHER), kd=KD,
                    data=DataConfig(vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=mbs, global_batch_size=mbs))
    student = build_gpt(cfg.model, cfg, VOCAB)
    teacher = build_gpt(cfg.teacher.model, cfg, VOCAB)
    model = DistillationModel(student, teacher)
    if variant == "fused":
        model = fuse_output_layer(model)
    ddp = wrap_ddp(model, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(MegatronOptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0), [ddp])
    loss = DistillationLoss(cfg.kd.loss_config())
    loss.step = KDStep(alpha=0.5, temperature=1.0)
    forward_step = make_forward_step(lambda it: next(it), loss)
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(SEQ).expand(mbs, SEQ)
    # Every step's batch made up front, so the measured window holds the step alone.
    batches = []
    for _ in range(steps):
        t = torch.randint(0, VOCAB, (mbs, SEQ + 1), generator=g)
        batches.append((t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.ones(mbs, SEQ), None, pos))

    base = _mem_mib("VmRSS")
    times, peaks, first = [], [], None
    for b in batches:
        _reset_peak()
        t0 = time.perf_counter()
        result = train_step(forward_step, iter([b]), ddp, optimizer, 1, SEQ, mbs)
        times.append(time.perf_counter() - t0)
        if not result.update_successful:
            raise RuntimeError(f"{variant}, micro-batch {mbs}: the optimizer skipped its update")
        peaks.append(_mem_mib("VmHWM") - base)
        if first is None:
            first = {"total loss": result.metrics.get("total loss"), "grad norm": result.grad_norm}
    peak = max(peaks)
    params = sum(p.numel() for p in student.parameters())
    return {"variant": variant, "mbs": mbs, "peak_mib": peak, "peaks": peaks, "base_mib": base, "times": times,
            "student_params": params, "first_step": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--budget-mib", default="auto", help="a figure in MiB, or auto (the unfused peak at micro-batch 4)")
    ap.add_argument("--steps", type=int, default=6, help="steps per process, --warmup of them untimed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = ap.parse_args()
    auto = args.budget_mib == "auto"
    budget = None if auto else float(args.budget_mib)
    if auto and "unfused" not in args.variants:
        ap.error("--budget-mib auto needs the unfused variant")
    variants = sorted(args.variants, key=VARIANTS.index)  # unfused first: auto takes its budget from it

    rows = []
    fits = {}
    for variant in variants:
        fits[variant] = None
        for mbs in sorted(args.mbs):
            r = run_distributed(_worker, 1, variant, mbs, args.steps, args.threads)[0]
            timed = r["times"][args.warmup:] or r["times"]
            r["step_s"] = min(timed)
            r["us_per_token"] = r["step_s"] / (mbs * SEQ) * 1e6
            r["first_loss"] = r["first_step"]["total loss"]
            rows.append(r)
            print(f"{variant:8s} mbs {mbs:3d}: peak +{r['peak_mib']:.0f} MiB "
                  f"(per step: {', '.join(f'{p:.0f}' for p in r['peaks'])}), step {r['step_s']:.3f} s "
                  f"(all: {', '.join(f'{t:.2f}' for t in r['times'])}), {r['us_per_token']:.1f} us/token; "
                  f"step 1: loss {r['first_step']['total loss']:.6f}, grad norm {r['first_step']['grad norm']:.6f}", flush=True)
            if auto and variant == "unfused" and mbs == 4:
                budget = math.ceil(r["peak_mib"] / 16) * 16
                print(f"budget: {budget} MiB (unfused peak at micro-batch 4, rounded up to 16 MiB)", flush=True)
            if budget is not None and r["peak_mib"] > budget:
                break
            if budget is None or r["peak_mib"] <= budget:
                fits[variant] = mbs
    if budget is None:
        raise SystemExit("no budget: --budget-mib auto needs micro-batch 4 in --mbs")
    # Rows measured before an auto budget was known: recheck them against it.
    for variant in variants:
        ok = [r["mbs"] for r in rows if r["variant"] == variant and r["peak_mib"] <= budget]
        fits[variant] = max(ok) if ok else None

    print(f"\nstudent {STUDENT.num_layers}x{STUDENT.hidden_size} ({rows[0]['student_params'] / 1e6:.2f} M params), "
          f"teacher {TEACHER.num_layers}x{TEACHER.hidden_size}, vocab {VOCAB}, seq {SEQ}, fp32, online KD "
          f"(forward KL, tau 1, top-0.95-50 renormalised, alpha 0.5); {args.threads} threads; torch {torch.__version__}; "
          f"budget {budget:.0f} MiB\n")
    print("| variant | micro-batch | tokens | peak rise MiB | of which step 1 / later | fits | step s | us / token |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        later = max(r["peaks"][1:]) if len(r["peaks"]) > 1 else float("nan")
        print(f"| {r['variant']} | {r['mbs']} | {r['mbs'] * SEQ} | {r['peak_mib']:.0f} | {r['peaks'][0]:.0f} / {later:.0f} | "
              f"{'yes' if r['peak_mib'] <= budget else 'no'} | {r['step_s']:.3f} | {r['us_per_token']:.1f} |")
    tried = max(args.mbs)
    print()
    for v in variants:
        f = fits[v]
        capped = " (the largest tried)" if f == tried else ""
        print(f"{v}: largest micro-batch within {budget:.0f} MiB = {f}{capped}")

    def at(v, mbs, key):
        return next((r[key] for r in rows if r["variant"] == v and r["mbs"] == mbs), None)

    summary = {"vocab": VOCAB, "seq": SEQ, "budget_mib": budget,
               "largest_mbs": {v: fits[v] for v in variants}, "largest_tried": tried}
    for v in variants:
        summary[f"peak_mib_{v}"] = {r["mbs"]: round(r["peak_mib"]) for r in rows if r["variant"] == v}
        summary[f"us_per_token_{v}"] = {r["mbs"]: round(r["us_per_token"], 1) for r in rows if r["variant"] == v}
    if len(variants) == 2:
        common = [m for m in sorted(args.mbs) if at("fused", m, "us_per_token") and at("unfused", m, "us_per_token")]
        summary["time_ratio_fused_vs_unfused"] = {
            m: round(at("fused", m, "us_per_token") / at("unfused", m, "us_per_token"), 3) for m in common}
        summary["step1_loss_max_abs_diff"] = max(
            abs(at("fused", m, "first_loss") - at("unfused", m, "first_loss")) for m in common) if common else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
