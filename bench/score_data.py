"""Benchmark: SALT_DS scoring throughput against the small teacher's forward alone.

    OMP_NUM_THREADS=2 .venv/bin/python bench/score_data.py [--steps 8] [--threads 2] [--repeats 3]

1. **Forward alone vs forward + scoring**: over the same pre-built micro-batches of the run's
   training samples, a loop of only the teacher's forwards, and a loop of forward +
   ``megadistill.salt.score.score_logits`` (the per-token loss, the top-k membership and the
   median). Alternated ``--repeats`` times; the fastest of each is reported (machine noise only
   ever adds time).
2. **The whole command**: ``megadistill.salt.score.score_data`` (what ``megadistill score-data``
   runs: data, checkpoint identity hashing, teacher load, data reads, scoring, sample hashes,
   atomic part writes, the joined arrays, manifest, histogram), timed for calls of ``--steps / 4``
   and ``--steps`` steps in one process (after a warm-up call; alternated ``--repeats`` times,
   the fastest of each kept): their difference per token is the
   marginal cost of scoring with everything the command does per sample (the fixed costs — data
   and teacher loading, hashing the checkpoint, the histogram — cancel); and the command's
   scoring loop alone (``score_data(..., timings=)``).

CPU, one process, fp32. The teacher is the DESIGN's small LM (2 layers × 128, 2 heads), vocab 2048,
seq 128, micro-batch 16, trained for 2 steps only so that a checkpoint exists: the scoring's cost
does not depend on what the teacher learned.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import embedded_corpus, short_run
from megadistill.config import DataSelectionConfig, ModelConfig, RunConfig, TeacherConfig
from megadistill.testing import run_distributed

SMALL_LM = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=2)
VOCAB, SEQ, MBS = 2048, 128, 16


def _corpus(root: Path):
    return embedded_corpus(root, VOCAB)


def _cfg(out: Path, corpus, steps: int, model: ModelConfig = SMALL_LM, **kw) -> RunConfig:
    return short_run(out, corpus, steps, model, SEQ, MBS, MBS, **kw)


def _train(cfg, threads):
    from megadistill.train import run

    torch.set_num_threads(threads)
    return run(cfg, progress=False)


def _loops(cfg, threads, repeats) -> dict:
    """Seconds of the forwards alone and of forwards + scoring, wall clock and this process's CPU
    time (all its threads; on a machine shared with other jobs the CPU time is the steadier
    figure), the fastest of ``repeats`` alternations."""
    from megatron.core import parallel_state

    from megadistill.config import CHECKPOINT_MODEL_PREFIX, run_vocab_size
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.salt.score import score_logits
    from megadistill.megatron.distributed import init_distributed

    torch.set_num_threads(threads)
    init_distributed(cfg)
    tokenizer, train_ds, _, _ = prepare_data(cfg)
    teacher = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, run_vocab_size(cfg, tokenizer.vocab_size)),
                                             resolve_teacher_checkpoint(cfg.teacher.checkpoint), CHECKPOINT_MODEL_PREFIX,
                                             vocab_size=tokenizer.vocab_size))
    group = parallel_state.get_tensor_model_parallel_group()
    n = cfg.training.train_steps * cfg.data.global_batch_size
    batches = []
    for a in range(0, n, MBS):
        chunk = [train_ds[j] for j in range(a, a + MBS)]
        batches.append({k: torch.stack([torch.as_tensor(s[k]) for s in chunk]) for k in ("tokens", "labels", "loss_mask", "position_ids")})
    sel = cfg.data_selection
    out = {"fwd": [], "scored": [], "fwd_cpu": [], "scored_cpu": []}
    with torch.no_grad():
        teacher(batches[0]["tokens"], batches[0]["position_ids"], None)  # warm-up
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                teacher(b["tokens"], b["position_ids"], None)
            out["fwd"].append(time.perf_counter() - t0)
            out["fwd_cpu"].append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            for b in batches:
                logits = teacher(b["tokens"], b["position_ids"], None)
                score_logits(logits, b["labels"], b["loss_mask"], sel.top_k, 1, group)
            out["scored"].append(time.perf_counter() - t0)
            out["scored_cpu"].append(time.process_time() - c0)
    return {k: min(v) for k, v in out.items()}


def _command_seconds(cfgs, threads) -> list[tuple[float, float, float]]:
    """``(whole call, its scoring loop, the loop's CPU time)`` seconds of ``score_data`` for each of ``cfgs`` in
    turn, in one process (the first call also pays the one-time imports: matplotlib, the dataset
    helpers)."""
    from megadistill.salt.score import score_data

    torch.set_num_threads(threads)
    out = []
    for cfg in cfgs:
        t0, timings = time.perf_counter(), {}
        score_data(cfg, progress=False, timings=timings)
        out.append((time.perf_counter() - t0, timings["loop_seconds"], timings["loop_cpu_seconds"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8, help="scored samples = steps x 16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=SMALL_LM.num_layers, help="teacher layers (default: the small LM's 2)")
    p.add_argument("--hidden", type=int, default=SMALL_LM.hidden_size, help="teacher hidden size (default 128)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the score directory (histogram.png) here")
    args = p.parse_args()
    teacher_model = replace(SMALL_LM, num_layers=args.layers, hidden_size=args.hidden)
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        root = Path(tmp)
        corpus = _corpus(root)
        run_distributed(_train, 1, _cfg(root / "teacher", corpus, 2, model=teacher_model), args.threads)
        scores = Path(args.keep) if args.keep else root / "scores"
        cfg = _cfg(root / "score", corpus, args.steps,
                   teacher=TeacherConfig(mode="online", model=teacher_model, checkpoint=str(root / "teacher" / "checkpoints")),
                   data_selection=DataSelectionConfig(scores=str(scores)))
        loops = run_distributed(_loops, 1, cfg, args.threads, args.repeats)[0]
        def sized(steps, name):
            return replace(cfg, output_dir=str(root / name), training=replace(cfg.training, train_steps=steps),
                           data_selection=replace(cfg.data_selection, scores=str(root / name / "scores")))

        runs = [sized(1, "warm")]
        for r in range(args.repeats):  # alternated, fresh directories: each call scores from scratch
            runs += [sized(max(1, args.steps // 4), f"quarter{r}"), sized(args.steps, f"full{r}")]
        runs[-1] = replace(runs[-1], data_selection=replace(runs[-1].data_selection, scores=str(scores)))
        times = run_distributed(_command_seconds, 1, runs, args.threads)[0][1:]
        (t_quarter, _, _), (whole, loop, loop_cpu) = min(times[0::2]), min(times[1::2])
    tokens = args.steps * MBS * SEQ
    print(f"teacher {args.layers} x {args.hidden}, vocab {VOCAB}, seq {SEQ}, micro-batch {MBS}, {tokens} tokens, {args.threads} threads")
    fwd, scored = loops["fwd"], loops["scored"]
    print(f"teacher forwards alone: {fwd:.3f} s wall ({tokens / fwd:,.0f} tokens/s), {loops['fwd_cpu']:.3f} s CPU")
    print(f"forwards + scoring:     {scored:.3f} s wall ({tokens / scored:,.0f} tokens/s), {loops['scored_cpu']:.3f} s CPU; "
          f"= {scored / fwd:.3f}x the forwards wall, {loops['scored_cpu'] / loops['fwd_cpu']:.3f}x CPU (target <= 1.2x)")
    q_tokens = max(1, args.steps // 4) * MBS * SEQ
    marginal = (whole - t_quarter) / (tokens - q_tokens)  # s/token: the fixed costs cancel
    print(f"score-data whole call:  {whole:.2f} s ({whole / fwd:.2f}x the forwards; {t_quarter:.2f} s for {q_tokens} tokens); "
          f"marginal cost {1 / marginal:,.0f} tokens/s = {marginal * tokens / fwd:.3f}x the forwards per token")
    print(f"score-data scoring loop: {loop:.2f} s wall ({tokens / loop:,.0f} tokens/s), {loop_cpu:.2f} s CPU; "
          f"= {loop / fwd:.3f}x the forwards wall, {loop_cpu / loops['fwd_cpu']:.3f}x CPU "
          "(data reads, forwards, scoring, hashes, part writes)")


if __name__ == "__main__":
    main()
