"""Benchmark: the fused output layer + distillation objective (``fused_output_distillation``)
against the unfused path and Megatron's output layer + cross entropy, on CPU (gloo).

    .venv/bin/python bench/fused_output.py [--tokens 2048 --hidden 1024 --vocabs 131072 151936 --tp 1 --reps 2]

Variants, each forward + backward into the hidden states and the output weight, student and an
online teacher of the same hidden size, dense forward KL, τ = 1, α = 0.5, fp32:

* ``fused``: ``fused_output_distillation(hidden, weight, ..., teacher_hidden, teacher_weight)``;
* ``unfused``: ``logits = hidden @ weight.T``, teacher logits likewise, ``vocab_parallel_distillation_loss``
  (its default, gradient in a buffer of its own), ``(total · mask).sum().backward()``;
* ``unfused_inplace``: the same with ``inplace=True`` (gradient in the logits' buffer, as Megatron's CE);
* ``megatron_ce``: the student's output layer and ``vocab_parallel_cross_entropy`` alone (no teacher).

Each variant runs in freshly forked ranks (``run_distributed``). Time: the fastest of ``--reps``
repetitions (max over ranks). Peak memory: the rise of the rank's peak resident set (Linux VmHWM,
reset after the inputs exist) over all repetitions, max over ranks. The last line is one JSON object:
``peak_ratio`` and ``time_ratio`` of fused ÷ unfused at TP = 1 for the largest vocabulary.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy

from megadistill.losses import KDLossConfig, fused_output_distillation, vocab_parallel_distillation_loss
from megadistill.testing import run_distributed

VARIANTS = ("fused", "unfused", "unfused_inplace", "megatron_ce")


def _mem_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(variant: str, tokens: int, hidden_size: int, vocab: int, reps: int, threads: int, chunk_tokens=None):
    torch.set_num_threads(threads)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    v = vocab // tp
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    weight = torch.randn(v, hidden_size, generator=g) * hidden_size**-0.5 * 3
    t_hidden = hidden + 0.5 * torch.randn(tokens, hidden_size, generator=g)
    t_weight = weight + 0.5 * torch.randn(v, hidden_size, generator=g) * hidden_size**-0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(tokens)
    cfg = KDLossConfig(chunk_tokens=chunk_tokens)

    def step():
        h = hidden.clone().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        hp = copy_to_tensor_model_parallel_region(h)
        if variant == "fused":
            loss = fused_output_distillation(hp, w, labels, mask, 0.5, cfg, teacher_hidden=t_hidden,
                                             teacher_weight=t_weight).loss
        elif variant.startswith("unfused"):
            logits = hp @ w.t()
            with torch.no_grad():
                teacher = t_hidden @ t_weight.t()
            terms = vocab_parallel_distillation_loss(logits, labels, teacher, cfg, 0.5,
                                                     inplace=variant == "unfused_inplace")
            loss = (terms.total * mask).sum()
        else:
            logits = (hp @ w.t()).unsqueeze(1)
            loss = (vocab_parallel_cross_entropy(logits, labels.unsqueeze(1)).squeeze(1) * mask).sum()
        loss.backward()
        return h.grad, w.grad

    base = _mem_mb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        grads = step()
        times.append(time.perf_counter() - t0)
        del grads
    return min(times), _mem_mb("VmHWM") - base


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocabs", type=int, nargs="+", default=[131072, 151936])
    p.add_argument("--tp", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (divided among TP ranks)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--chunk-tokens", type=int, default=None, help="KDLossConfig.chunk_tokens (default: automatic)")
    args = p.parse_args()
    results = {}
    print("| TP | vocab | variant | seconds | peak MiB |")
    print("|---|---:|---|---:|---:|")
    for tp in args.tp:
        for vocab in args.vocabs:
            for variant in args.variants:
                per_rank = run_distributed(_worker, tp, variant, args.tokens, args.hidden, vocab, args.reps,
                                           max(1, args.threads // tp), args.chunk_tokens, tp=tp)
                secs, peak = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
                results[(tp, vocab, variant)] = (secs, peak)
                print(f"| {tp} | {vocab} | {variant} | {secs:.2f} | {peak:.0f} |", flush=True)
    tp, vocab = min(args.tp), max(args.vocabs)
    f, u = results.get((tp, vocab, "fused")), results.get((tp, vocab, "unfused"))
    summary = {"tp": tp, "vocab": vocab, "tokens": args.tokens, "hidden": args.hidden}
    if f and u:
        summary.update(peak_ratio=round(f[1] / u[1], 3), time_ratio=round(f[0] / u[0], 3))
        ui = results.get((tp, vocab, "unfused_inplace"))
        if ui:
            summary.update(peak_ratio_vs_inplace=round(f[1] / ui[1], 3), time_ratio_vs_inplace=round(f[0] / ui[0], 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
