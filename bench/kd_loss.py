"""Benchmark: vocab-parallel forward-KL fwd+bwd vs Megatron's vocab-parallel cross entropy vs a naive
all-gather + ``F.kl_div`` version, and the distillation objective (1-α)·LM + α·KD as the training
step computes it (fused, and the former path: KD + Megatron CE + two argmaxes), side by side on the
same logits, TP=2 on gloo (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/kd_loss.py [--seq 512 --batch 4 --vocab 32000 --reps 5]
    OMP_NUM_THREADS=1 .venv/bin/python bench/kd_loss.py --profile   # where the objective's time goes

Time is the median over ``--reps`` interleaved repetitions (max over the two ranks); peak memory is
the rise of the process's peak resident set above what the inputs already hold (Linux VmHWM, reset
before each measurement), max over ranks. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss, vocab_parallel_kd_loss
from megadistill.losses.parallel import vocab_parallel_argmax
from megadistill.testing import run_distributed


def _mem_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(fn):
    """(seconds, peak MB above the resident set at the start) of one fwd+bwd.

    ``fn()`` returns the timed callable, so that per-run set-up stays out of the measurement.
    """
    run = fn()
    dist.barrier()
    _reset_peak()
    base = _mem_mb("VmRSS")
    t0 = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t0
    return elapsed, _mem_mb("VmHWM") - base


def _worker(seq: int, batch: int, vocab: int, reps: int, profile: bool = False):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(parallel_state.get_tensor_model_parallel_rank())
    student = torch.randn(seq, batch, vocab // tp, generator=g) * 3
    teacher = torch.randn(seq, batch, vocab // tp, generator=g) * 3
    target = torch.randint(0, vocab, (seq, batch), generator=g)
    grad_out = torch.ones(seq, batch)

    def megatron_ce():
        x = student.detach().clone().requires_grad_(True)  # its forward works in place on fp32 logits
        return lambda: vocab_parallel_cross_entropy(x, target).backward(grad_out)

    def ours(chunk, inplace=False):
        cfg = KDLossConfig(loss="forward_kl", chunk_tokens=chunk)

        def setup():
            leaf = student.detach().requires_grad_(True)
            # Logits come out of the output layer (a graph node): in place, the loss overwrites
            # its own copy of them, as Megatron's CE does with its input.
            x = leaf.clone() if inplace else leaf
            return lambda: vocab_parallel_kd_loss(x, teacher, cfg, inplace=inplace).backward(grad_out)

        return setup

    def naive():
        return _naive

    def unfused_objective(tau, alpha=0.5):
        # The training step before the fused objective (megadistill.megatron.loss until issue 11):
        # KD with its own gradient buffer, then Megatron's CE in place, then the two argmaxes.
        cfg = KDLossConfig(loss="forward_kl", temperature=tau)

        def setup():
            leaf = student.detach().requires_grad_(True)
            x = leaf.clone()  # the output layer's fresh logits

            def run():
                kd = vocab_parallel_kd_loss(x, teacher, cfg, group)
                with torch.no_grad():
                    agree = vocab_parallel_argmax(x, group) == vocab_parallel_argmax(teacher, group)
                lm = vocab_parallel_cross_entropy(x, target)
                (alpha * kd.sum() + (1 - alpha) * lm.sum()).backward()
                return agree

            return run

        return setup

    def fused_objective(tau, alpha=0.5):
        cfg = KDLossConfig(loss="forward_kl", temperature=tau)

        def setup():
            leaf = student.detach().requires_grad_(True)
            x = leaf.clone()
            return lambda: vocab_parallel_distillation_loss(
                x, target, teacher, cfg, alpha, group, inplace=True
            ).total.sum().backward()

        return setup

    def _naive():
        x = student.detach().requires_grad_(True)
        full_s = torch.cat(torch.distributed.nn.functional.all_gather(x, group=group), dim=-1)
        parts = [torch.empty_like(teacher) for _ in range(tp)]
        dist.all_gather(parts, teacher, group=group)
        full_t = torch.cat(parts, dim=-1)
        loss = F.kl_div(F.log_softmax(full_s, -1), F.log_softmax(full_t, -1), reduction="none", log_target=True)
        loss.sum(-1).backward(grad_out)

    if profile:
        return _profile(
            {"megatron CE": megatron_ce, "fused τ=1": fused_objective(1.0), "fused τ=2": fused_objective(2.0)}, reps
        )

    variants = {
        "megatron vocab_parallel_cross_entropy": megatron_ce,
        "megadistill forward KL, in place (as Megatron CE)": ours(None, inplace=True),
        "megadistill forward KL, separate gradient buffer": ours(None),
        "megadistill forward KL, in place, one chunk": ours(seq * batch, inplace=True),
        "objective α=0.5 τ=1, former path (KD separate buffer + Megatron CE + argmaxes)": unfused_objective(1.0),
        "objective α=0.5 τ=1, fused (in place)": fused_objective(1.0),
        "objective α=0.5 τ=2, former path (KD separate buffer + Megatron CE + argmaxes)": unfused_objective(2.0),
        "objective α=0.5 τ=2, fused (in place)": fused_objective(2.0),
        "naive all-gather + F.kl_div": naive,
    }
    for fn in variants.values():  # warm-up
        fn()()
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t, m = _measure(fn)
            times[name].append(t)
            peaks[name] = max(peaks[name], m)
    return {k: (statistics.median(times[k]), peaks[k]) for k in variants}


def _profile(variants, reps: int):
    """``{variant: (total ms, [(operator, self CPU ms, calls), ...])}``, per run (mean over ``reps``)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in variants.items():
        fn()()  # warm-up
        runs = [fn() for _ in range(reps)]
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for run in runs:
                run()
            total = (time.perf_counter() - t0) / reps
        ops = sorted(
            ((e.key, e.self_cpu_time_total / 1e3 / reps, e.count // reps) for e in prof.key_averages()),
            key=lambda r: -r[1],
        )
        out[name] = (total * 1e3, ops)
    return out


def _print_profile(res) -> None:
    for name, (total, ops) in res.items():
        print(f"\n{name}: {total:.0f} ms per fwd+bwd (profiled, rank 0)\n")
        print("| operator | self CPU ms | calls | share |")
        print("|---|---:|---:|---:|")
        shown = 0.0
        for op, ms, calls in ops:
            if ms < 0.02 * total:
                break
            shown += ms
            print(f"| {op} | {ms:.1f} | {calls} | {ms / total:.0%} |")
        print(f"| (the rest) | {total - shown:.1f} | | {(total - shown) / total:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="per-operator CPU time instead of the table")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.profile:
        _print_profile(run_distributed(_worker, 2, args.seq, args.batch, args.vocab, args.reps, True, tp=2)[0])
        return
    per_rank = run_distributed(_worker, 2, args.seq, args.batch, args.vocab, args.reps, tp=2)
    res = {k: (max(r[k][0] for r in per_rank), max(r[k][1] for r in per_rank)) for k in per_rank[0]}
    names = list(res)
    ce_t = res[names[0]][0]
    ours_t, ours_m = res[names[1]]
    naive_t, naive_m = res[names[-1]]
    print(f"TP=2 gloo, seq {args.seq} x micro-batch {args.batch} x vocab {args.vocab} (v/tp = {args.vocab // 2}), fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)/rank, median of {args.reps}\n")
    print("| fwd+bwd | time (ms) | x Megatron CE | peak extra memory / rank (MB) |")
    print("|---|---:|---:|---:|")
    for name, (t, m) in res.items():
        print(f"| {name} | {t * 1e3:.0f} | {t / ce_t:.2f} | {m:.0f} |")
    print()
    print(f"ours (in place, default chunking) vs Megatron CE time: {ours_t / ce_t:.2f}x (target <= 2.0x); "
          f"with a separate gradient buffer: {res[names[2]][0] / ce_t:.2f}x")
    sep_t, sep_m = res[names[2]]
    ours_m = max(ours_m, 1.0)  # in place, the rise can round to 0 MB
    print(f"naive vs ours: {naive_t / ours_t:.1f}x slower, {naive_m / ours_m:.1f}x more peak memory (in place); "
          f"{naive_t / sep_t:.1f}x and {naive_m / sep_m:.1f}x with a separate gradient buffer (targets >= 2x)")
    ce_m = res[names[0]][1]
    for tau, target_x in (("1", 1.5), ("2", 1.8)):
        f_t, f_m = next(v for k, v in res.items() if k.startswith(f"objective α=0.5 τ={tau}, fused"))
        u_t, u_m = next(v for k, v in res.items() if k.startswith(f"objective α=0.5 τ={tau}, former"))
        print(f"fused objective τ={tau}: {f_t / ce_t:.2f}x Megatron CE (target <= {target_x}x), {u_t / f_t:.2f}x faster "
              f"than the former path; peak extra memory {f_m:.0f} MB vs Megatron CE's {ce_m:.0f} MB (target <=) "
              f"and the former path's {u_m:.0f} MB")


if __name__ == "__main__":
    main()
