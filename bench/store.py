"""Bytes/token, precision and read throughput of the logits store's encodings on synthetic teacher distributions,
and what tempered tails (format version 4) cost.

``python bench/store.py [--vocab 32000 151936] [--tokens 4096] [--draws 12] [--student-tokens-per-s 7000]
[--temperatures-only]``.
The teacher logits are Zipf-like (``-a·log(rank)`` with a random permutation of the vocabulary and
Gaussian noise, a drawn per position so that some positions are confident and some flat), which
sets how often top-p binds before top-k; real teachers differ, so the ids/position column matters
as much as bytes/token.

Per row: bytes/token of one shard (``--tokens`` tokens in samples of 1024), the precision of the
decoded targets against the float64 ones (max |Δp| over kept ids, mean and max per-position
KL(stored ‖ exact) on the kept ids plus the ghost bucket; ``megadistill.store.inspect_store.encoding_error``),
and decode throughput (``Shard.sample`` of every sample, best of 3 passes, one thread) with its
ratio to ``--student-tokens-per-s`` (the issue's target: ≥ 20×).

Tempered tails (a second table; ``--temperatures-only`` prints it alone): per top-p-k truncation,
the bytes/token of the shard's ``tails`` section per temperature (float32, raw and zstd; the
target: ≤ 4 B/token per τ), and the cost of the target selection (``select_top_p_k``) with
temperatures (), (2,) and (0.5, 2, 4) side by side, best of 3 passes over the same logits, with
its ratio to the selection without tails.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megadistill.losses.config import KDLossConfig
from megadistill.store.decode import Shard
from megadistill.store.encode import SampleTargets, encode_shard
from megadistill.store.format import sample_hash
from megadistill.store.inspect_store import encoding_error
from megadistill.store.precompute import rskd_uniforms, sample_rskd, select_top_p_k

SEQ = 1024
# (log-prob encoding, compression) rows of each top-p-k truncation.
ENCODINGS = (("fp32", None), ("fp16", None), ("fp16", "zstd"), ("qlog64", None), ("qlog64", "zstd"),
             ("qlog16", "zstd"))


def synthetic_logits(tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = 0.8 + 1.6 * torch.rand(tokens, 1, generator=g)  # Zipf exponent per position
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()
    z = -a * ranks + 0.3 * torch.randn(tokens, vocab, generator=g)
    perm = torch.randperm(vocab, generator=g)
    return z[:, perm]


# Chunk of positions the selection works on: the [c, vocab] float64 normaliser of a whole sample is 1.2 GB at 152 k.
CHUNK = 256
# Tail temperature sets whose selection cost is compared (the first: no tails).
TAIL_SETS = ((), (2.0,), (0.5, 2.0, 4.0))


def top_p_k_samples(vocab: int, tokens: int, top_p: float, top_k, temperatures: tuple = ()) -> list[SampleTargets]:
    """Float64 top-p-k targets of ``tokens`` synthetic positions, as samples of ``SEQ`` (with their
    tempered tails at ``temperatures``, if any)."""
    cfg = KDLossConfig(top_p=top_p, top_k=top_k)
    samples = []
    for s in range(tokens // SEQ):
        logits = synthetic_logits(SEQ, vocab, seed=s)
        counts, ids, lps, res, tails = [], [], [], [], []
        for a in range(0, SEQ, CHUNK):
            i, lp, r, t = (x.numpy() for x in select_top_p_k(logits[a : a + CHUNK], cfg, None, temperatures))
            valid = i >= 0
            counts.append(valid.sum(-1)), ids.append(i[valid]), lps.append(lp[valid]), res.append(r), tails.append(t)
        cat = np.concatenate
        samples.append(SampleTargets(sample_hash(np.zeros(SEQ), np.zeros(SEQ)), cat(counts), cat(res), cat(ids), cat(lps),
                                     tails=cat(tails) if temperatures else None))
    return samples


def selection_seconds(vocab: int, tokens: int, top_p: float, top_k, temperatures: tuple, logits=None) -> float:
    """Seconds ``select_top_p_k`` takes over ``tokens`` synthetic positions (in chunks of ``CHUNK``)
    with tails at ``temperatures``, best of 3 passes (the logits made beforehand, not timed)."""
    cfg = KDLossConfig(top_p=top_p, top_k=top_k)
    logits = logits if logits is not None else [synthetic_logits(SEQ, vocab, seed=s) for s in range(tokens // SEQ)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for z in logits:
            for a in range(0, SEQ, CHUNK):
                select_top_p_k(z[a : a + CHUNK], cfg, None, temperatures)
        best = min(best, time.perf_counter() - t0)
    return best


def tails_bytes_per_token(vocab: int, samples: list[SampleTargets], temperatures: tuple, compression) -> float:
    """Bytes/token of the ``tails`` section of a shard of ``samples``, per temperature (fp32 log-probs;
    the section's size does not depend on their encoding)."""
    shard = Shard(encode_shard(0, samples, SEQ, vocab, "fp32", compression=compression, tail_temperatures=temperatures),
                  "bench")
    return shard.header["sections"]["tails"][1] / (len(samples) * SEQ * len(temperatures))


def temperature_rows(vocabs, tokens: int) -> None:
    """The tempered tails' table: bytes/token per τ and the selection's cost against no tails."""
    print("| vocab | truncation | tails B/token per τ: fp32 (T=1 / T=3) | zstd (T=1 / T=3) | "
          + " | ".join(f"select T={len(t)} s" for t in TAIL_SETS) + " | " + " | ".join(f"ratio T={len(t)}" for t in TAIL_SETS[1:])
          + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(TAIL_SETS) - 1))
    for vocab in vocabs:
        logits = [synthetic_logits(SEQ, vocab, seed=s) for s in range(tokens // SEQ)]
        for top_p, top_k in ((0.95, 100), (0.95, 50)):
            size = {}
            for temps in TAIL_SETS[1:]:
                samples = top_p_k_samples(vocab, tokens, top_p, top_k, temps)
                for comp in (None, "zstd"):
                    size[temps, comp] = tails_bytes_per_token(vocab, samples, temps, comp)
            # Interleaved passes (each the best of 3) so that machine load shifts every set alike.
            secs = {t: selection_seconds(vocab, tokens, top_p, top_k, t, logits) for t in TAIL_SETS}
            raw = " / ".join(f"{size[t, None]:.2f}" for t in TAIL_SETS[1:])
            z = " / ".join(f"{size[t, 'zstd']:.2f}" for t in TAIL_SETS[1:])
            print(f"| {vocab} | top-{top_p}-{top_k} | {raw} | {z} | " + " | ".join(f"{secs[t]:.3f}" for t in TAIL_SETS)
                  + " | " + " | ".join(f"{secs[t] / secs[()]:.2f}×" for t in TAIL_SETS[1:]) + " |", flush=True)


def measure(vocab: int, samples: list[SampleTargets], encoding: str, compression) -> dict:
    shard = Shard(encode_shard(0, samples, SEQ, vocab, encoding, compression=compression), "bench")
    row = _size_and_read_speed(shard, len(samples))
    got = [shard.sample_flat(j) for j in range(len(samples))]
    cat = np.concatenate
    row.update(encoding_error(cat([s.counts for s in samples]), cat([s.logprobs for s in samples]),
                              cat([s.residual for s in samples]), cat([g[2] for g in got]), cat([g[3] for g in got])))
    return row


def _size_and_read_speed(shard: Shard, num_samples: int) -> dict:
    """Bytes/token of an encoded shard, ids kept per position, and how fast its samples decode."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for s in range(num_samples):
            shard.sample(s)
        best = min(best, time.perf_counter() - t0)
    n = num_samples * SEQ
    return {"bytes_per_token": shard.nbytes / n, "ids_per_position": shard.entries / n, "read_tokens_per_s": n / best}


def rskd_samples(vocab: int, tokens: int, draws: int) -> list[SampleTargets]:
    """RS-KD targets (``draws`` samples per position) of ``tokens`` synthetic positions."""
    samples = []
    for s in range(tokens // SEQ):
        u = torch.from_numpy(rskd_uniforms(0, np.full(SEQ, s), np.arange(SEQ), draws))
        ids, cnt = sample_rskd(synthetic_logits(SEQ, vocab, seed=s), u, None)
        ids, cnt = ids.numpy(), cnt.numpy()
        valid = ids >= 0
        samples.append(SampleTargets(sample_hash(np.zeros(SEQ), np.zeros(SEQ)), valid.sum(-1), None,
                                     ids[valid], None, draws=cnt[valid]))
    return samples


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, nargs="*", default=[32000, 151936])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--draws", type=int, nargs="*", default=[12], help="RS-KD draws per position (rows RS-KD-N)")
    p.add_argument("--student-tokens-per-s", type=float, default=7000.0,
                   help="tokens/s a student step consumes (default: the demo's plain LM step on this CPU)")
    p.add_argument("--temperatures-only", action="store_true",
                   help="print only the tempered tails' table (bytes/token per τ, selection cost)")
    args = p.parse_args()
    if args.temperatures_only:
        temperature_rows(args.vocab, args.tokens)
        return
    print("| vocab | truncation | encoding | ids/position | bytes/token | max abs dp | mean KL | max KL | "
          "read tokens/s | read / student |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def line(vocab, what, enc, r, precise=True):
        prec = f"{r['max_abs_dp']:.2g} | {r['mean_kl']:.2g} | {r['max_kl']:.2g}" if precise else "exact | 0 | 0"
        print(f"| {vocab} | {what} | {enc} | {r['ids_per_position']:.1f} | {r['bytes_per_token']:.1f} | {prec} | "
              f"{r['read_tokens_per_s']:.3g} | {r['read_tokens_per_s'] / args.student_tokens_per_s:.0f}× |", flush=True)

    for vocab in args.vocab:
        for top_p, top_k in ((0.95, 100), (0.95, 50)):
            samples = top_p_k_samples(vocab, args.tokens, top_p, top_k)
            for enc, comp in ENCODINGS:
                line(vocab, f"top-{top_p}-{top_k}", enc + ("+zstd" if comp else ""), measure(vocab, samples, enc, comp))
        for draws in args.draws:
            samples = rskd_samples(vocab, args.tokens, draws)
            for comp in (None, "zstd"):
                shard = Shard(encode_shard(0, samples, SEQ, vocab, None, kind="rskd", num_draws=draws, compression=comp), "b")
                line(vocab, f"RS-KD-{draws}", "uint8 counts" + ("+zstd" if comp else ""),
                     _size_and_read_speed(shard, len(samples)), precise=False)
    print()
    temperature_rows(args.vocab, args.tokens)


if __name__ == "__main__":
    main()
