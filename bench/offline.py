"""Benchmark: the offline logits store end to end, side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/offline.py [--steps 12] [--format top_p_k|rskd] [--repeats 3]
        [--tempered 2 ...]

1. **Precompute vs the teacher's forward alone**: ``megadistill.store.precompute.precompute`` over
   ``steps × 16`` samples, against a loop of only the teacher's forwards over the same micro-batches
   (same model, same loaded checkpoint). Reported both for the whole call (data, model and
   checkpoint loading, hashing, writing, manifest) and for its forward+select+encode loop alone
   (the whole call minus its one-time setup, measured as the precompute of a store that already
   exists up to its manifest check). The target selection (``select_top_p_k`` / ``sample_rskd``)
   is also timed alone on the same forwards' logits, so the loop's cost splits into its parts.
2. **Offline-KD student step vs a plain LM step**: ``megadistill.train.run`` of the same student
   (3 layers × 192, vocab 2048, seq 128, global batch 16, micro-batch 8) with ``teacher.mode: none``
   and with ``teacher.mode: offline`` on the store just written; median of the per-step wall time
   (``tokens_per_s`` in metrics.jsonl) after the first step, alternated (none, offline, none,
   offline) to spread machine noise over both.

CPU, one process, fp32. The teacher (4 layers × 256) is trained for 2 steps, only so that a
checkpoint exists; its distributions' sharpness does not matter for timing except through the
number of kept ids (reported).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import embedded_corpus, short_run
from megadistill.config import KDConfig, ModelConfig, RunConfig, TeacherConfig
from megadistill.schedules import AlphaSchedule
from megadistill.testing import run_distributed

STUDENT = ModelConfig(num_layers=3, hidden_size=192, num_attention_heads=4)
TEACHER = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4)
VOCAB, SEQ, GBS, MBS = 2048, 128, 16, 8


def _corpus(root: Path):
    return embedded_corpus(root, VOCAB)


def _cfg(out: Path, corpus, steps: int, model: ModelConfig = STUDENT, **kw) -> RunConfig:
    return short_run(out, corpus, steps, model, SEQ, MBS, GBS, **kw)


def _kd() -> KDConfig:
    return KDConfig(top_p=0.95, top_k=50, truncation="ghost", alpha=AlphaSchedule("constant", alpha_max=0.5))


def _clock() -> np.ndarray:
    """(wall, this process's CPU) seconds. CPU time (all threads) is the steadier figure on a
    machine shared with other jobs: it does not count the time other processes hold the cores."""
    return np.array([time.perf_counter(), time.process_time()])


def _train(cfg, threads):
    from megadistill.train import run

    torch.set_num_threads(threads)
    return run(cfg, progress=False)


def _teacher_forward_seconds(cfg, threads, kind="top_p_k", draws=12) -> tuple[np.ndarray, np.ndarray]:
    """(only the teacher's forwards over the precompute's micro-batches, model built and loaded
    first; only the target selection on those forwards' logits, ``select_top_p_k`` or
    ``sample_rskd`` with its uniforms): the two costs the precompute loop adds up, apart. Each
    as (wall, CPU) seconds."""
    from megadistill.config import CHECKPOINT_MODEL_PREFIX, run_vocab_size
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.store.precompute import rskd_uniforms, sample_rskd, select_top_p_k
    from megadistill.megatron.distributed import init_distributed

    torch.set_num_threads(threads)
    init_distributed(cfg)
    tokenizer, train_ds, _, _ = prepare_data(cfg)
    vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    teacher = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, vocab),
                                             resolve_teacher_checkpoint(cfg.teacher.checkpoint), CHECKPOINT_MODEL_PREFIX,
                                             vocab_size=tokenizer.vocab_size))
    n = cfg.training.train_steps * cfg.data.global_batch_size
    batches = []
    for a in range(0, n, MBS):
        chunk = [train_ds[j] for j in range(a, a + MBS)]
        batches.append((torch.stack([torch.as_tensor(s["tokens"]) for s in chunk]),
                        torch.stack([torch.as_tensor(s["position_ids"]) for s in chunk])))
    with torch.no_grad():
        teacher(*batches[0], None)  # warm-up
        t0 = _clock()
        for tokens, pos in batches:
            teacher(tokens, pos, None)
        fwd = _clock() - t0
        select = np.zeros(2)
        for i, (tokens, pos) in enumerate(batches):
            logits = teacher(tokens, pos, None).reshape(tokens.numel(), -1)
            t0 = _clock()
            if kind == "rskd":
                u = rskd_uniforms(cfg.training.seed, np.repeat(np.arange(i * MBS, (i + 1) * MBS), SEQ), np.tile(np.arange(SEQ), MBS), draws)
                sample_rskd(logits, torch.from_numpy(u), None)
            else:
                select_top_p_k(logits, cfg.kd.loss_config(), None)
            select += _clock() - t0
    return fwd, select


def _precompute_seconds(cfg, threads, kind, draws, temperatures=None) -> tuple[np.ndarray, np.ndarray]:
    """(whole precompute call, its setup alone): the setup is timed as a second call on the finished
    store, which builds data, model and checkpoint, checks the plan and returns. Each as (wall,
    CPU) seconds. ``temperatures``: precompute's (None: the run's τ)."""
    from megadistill.store.precompute import precompute

    torch.set_num_threads(threads)
    t0 = _clock()
    precompute(cfg, progress=False, kind=kind, draws=draws, temperatures=temperatures)
    whole = _clock() - t0
    t0 = _clock()
    precompute(cfg, progress=False, kind=kind, draws=draws, temperatures=temperatures)
    return whole, _clock() - t0


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "tokens_per_s" in r][1:]


def _step_seconds(out: Path) -> list[float]:
    return [GBS * SEQ / r["tokens_per_s"] for r in _rows(out)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--format", choices=("top_p_k", "rskd"), default="top_p_k")
    p.add_argument("--draws", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate the forwards-alone and precompute measurements this many times; report the fastest "
                        "of each and the median of the per-repeat ratios (on a shared machine, the least disturbed)")
    p.add_argument("--precompute-only", action="store_true", help="skip the student step comparison")
    p.add_argument("--tempered", type=float, nargs="*", default=[], metavar="TAU",
                   help="top_p_k: also precompute the same store with tails at these temperatures (besides 1), "
                        "alternated with the plain one in every repeat, and report the loop ratio")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
        root = Path(tmp)
        corpus = _corpus(root)
        teacher_run = _cfg(root / "teacher", corpus, 2, model=TEACHER)
        run_distributed(_train, 1, teacher_run, args.threads)
        ckpt = str(root / "teacher" / "checkpoints")
        store = root / "store"
        off = lambda out: _cfg(out, corpus, args.steps, kd=_kd(),  # noqa: E731
                               teacher=TeacherConfig(mode="offline", model=TEACHER, checkpoint=ckpt, store=str(store)))
        pre = off(root / "pre")
        fwds, selects, wholes, setups, tempered = [], [], [], [], []
        for _ in range(args.repeats):
            fwd, select = run_distributed(_teacher_forward_seconds, 1, pre, args.threads, args.format, args.draws)[0]
            shutil.rmtree(store, ignore_errors=True)
            whole, setup = run_distributed(_precompute_seconds, 1, pre, args.threads, args.format, args.draws)[0]
            fwds.append(fwd), selects.append(select), wholes.append(whole), setups.append(setup)
            if args.tempered:
                shutil.rmtree(store, ignore_errors=True)
                tw, ts = run_distributed(_precompute_seconds, 1, pre, args.threads, args.format, args.draws,
                                         [1.0, *args.tempered])[0]
                tempered.append(tw - ts)
        from megadistill.store.inspect_store import info

        size_line = [line for line in info(store) if line.startswith("size")][0]
        plain, kd, stall = [], [], []
        for rep in range(0 if args.precompute_only else 2):
            run_distributed(_train, 1, _cfg(root / f"plain{rep}", corpus, args.steps), args.threads)
            run_distributed(_train, 1, off(root / f"offline{rep}"), args.threads)
            plain += _step_seconds(root / f"plain{rep}")
            kd += _step_seconds(root / f"offline{rep}")
            # The time split() spent on this rank (waiting for or decoding targets), per step.
            stall += [r.get("teacher_time_fraction", float("nan")) * GBS * SEQ / r["tokens_per_s"]
                      for r in _rows(root / f"offline{rep}")]
    tokens = args.steps * GBS * SEQ
    loops = [w - s for w, s in zip(wholes, setups)]
    print(f"store: {args.format}{f' ({args.draws} draws)' if args.format == 'rskd' else ' top-0.95-50'}; {size_line}")
    print(f"{args.repeats} alternating repeats, wall s: forwards {', '.join(f'{t[0]:.2f}' for t in fwds)}; "
          f"precompute loop {', '.join(f'{t[0]:.2f}' for t in loops)}")
    for i, clock in enumerate(("wall", "CPU")):
        fwd, select, whole, setup, loop = (min(t[i] for t in ts) for ts in (fwds, selects, wholes, setups, loops))
        # Each repeat's ratios pair measurements taken minutes apart at most: their median is
        # steadier on a shared machine than a ratio of minima taken at different moments.
        r_sel = statistics.median(s[i] / f[i] for s, f in zip(selects, fwds))
        r_loop = statistics.median(lo[i] / f[i] for lo, f in zip(loops, fwds))
        r_whole = statistics.median(w[i] / f[i] for w, f in zip(wholes, fwds))
        print(f"[{clock}] fastest: teacher forwards alone over {tokens} tokens {fwd:.2f} s, target selection alone on "
              f"their logits {select:.2f} s, precompute whole call {whole:.2f} s (setup {setup:.2f} s), "
              f"forward+select+encode+write loop {loop:.2f} s")
        print(f"[{clock}] median ratio to the forwards: selection alone {r_sel:.2f}x, precompute whole call "
              f"{r_whole:.2f}x, loop {r_loop:.2f}x (target <= 1.3x)")
    if tempered:
        ratio = [t[0] / lo[0] for t, lo in zip(tempered, loops)]
        print(f"tails at τ = {', '.join(f'{t:g}' for t in args.tempered)}: precompute loop wall "
              f"{', '.join(f'{t[0]:.2f}' for t in tempered)} s; per-repeat ratio to the plain loop "
              f"{', '.join(f'{r:.3f}' for r in ratio)} (median {statistics.median(ratio):.3f}x)")
    if plain:
        mp, mk = statistics.median(plain), statistics.median(kd)
        print(f"student step (median of {len(plain)}): plain LM {mp * 1e3:.0f} ms, offline KD {mk * 1e3:.0f} ms "
              f"({mk / mp:.3f}x; target <= 1.10x); of the offline step, {statistics.median(stall) * 1e3:.1f} ms "
              "in the store reader (split)")


if __name__ == "__main__":
    main()
