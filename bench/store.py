"""Bytes/token and read throughput of the logits store on synthetic teacher distributions.

``python bench/store.py [--vocab 32000 151936] [--tokens 4096] [--draws 12]``. The teacher logits are Zipf-like
(``-a·log(rank)`` with a random permutation of the vocabulary and Gaussian noise, a drawn per
position so that some positions are confident and some flat), which sets how often top-p binds
before top-k; real teachers differ, so the ids/position column matters as much as bytes/token.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megadistill.losses.config import KDLossConfig
from megadistill.store.format import SampleTargets, Shard, encode_shard, sample_hash
from megadistill.store.precompute import rskd_uniforms, sample_rskd, select_top_p_k


def synthetic_logits(tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = 0.8 + 1.6 * torch.rand(tokens, 1, generator=g)  # Zipf exponent per position
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()
    z = -a * ranks + 0.3 * torch.randn(tokens, vocab, generator=g)
    perm = torch.randperm(vocab, generator=g)
    return z[:, perm]


def measure(vocab: int, tokens: int, top_p: float, top_k, dtype: str, seq: int = 1024) -> dict:
    cfg = KDLossConfig(top_p=top_p, top_k=top_k)
    logits = synthetic_logits(tokens, vocab)
    ids, lp, res = select_top_p_k(logits, cfg, None)
    ids, lp, res = ids.numpy(), lp.numpy(), res.numpy()
    samples = []
    for s in range(tokens // seq):
        sl = slice(s * seq, (s + 1) * seq)
        valid = ids[sl] >= 0
        samples.append(SampleTargets(sample_hash(np.zeros(seq), np.zeros(seq)), valid.sum(-1), res[sl],
                                     ids[sl][valid], lp[sl][valid]))
    return _size_and_read_speed(encode_shard(0, samples, seq, vocab, dtype), len(samples), seq, ids)


def _size_and_read_speed(buf: bytes, num_samples: int, seq: int, ids: np.ndarray) -> dict:
    """Bytes/token of an encoded shard, ids kept per position, and how fast its samples decode."""
    shard = Shard(buf, "bench")
    t0 = time.perf_counter()
    for s in range(num_samples):
        shard.sample(s)
    read = time.perf_counter() - t0
    n = num_samples * seq
    return {"bytes_per_token": len(buf) / n, "ids_per_position": float((ids >= 0).sum()) / ids.shape[0],
            "read_tokens_per_s": n / read}


def measure_rskd(vocab: int, tokens: int, draws: int, seq: int = 1024) -> dict:
    """Bytes/token and read throughput of RS-KD targets (``draws`` samples per position)."""
    logits = synthetic_logits(tokens, vocab)
    u = torch.from_numpy(rskd_uniforms(0, np.arange(tokens) // seq, np.arange(tokens) % seq, draws))
    ids, cnt = sample_rskd(logits, u, None)
    ids, cnt = ids.numpy(), cnt.numpy()
    samples = []
    for s in range(tokens // seq):
        sl = slice(s * seq, (s + 1) * seq)
        valid = ids[sl] >= 0
        samples.append(SampleTargets(sample_hash(np.zeros(seq), np.zeros(seq)), valid.sum(-1), None,
                                     ids[sl][valid], None, draws=cnt[sl][valid]))
    return _size_and_read_speed(encode_shard(0, samples, seq, vocab, None, kind="rskd", num_draws=draws),
                                len(samples), seq, ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, nargs="*", default=[32000, 151936])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--draws", type=int, nargs="*", default=[12], help="RS-KD draws per position (rows RS-KD-N)")
    args = p.parse_args()
    print("| vocab | truncation | encoding | ids/position | bytes/token | read tokens/s |")
    print("|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for top_p, top_k in ((0.95, 100), (0.95, 50)):
            for dtype in ("fp16", "fp32"):
                r = measure(vocab, args.tokens, top_p, top_k, dtype)
                print(f"| {vocab} | top-{top_p}-{top_k} | {dtype} | {r['ids_per_position']:.1f} | "
                      f"{r['bytes_per_token']:.1f} | {r['read_tokens_per_s']:.3g} |")
        for draws in args.draws:
            r = measure_rskd(vocab, args.tokens, draws)
            print(f"| {vocab} | RS-KD-{draws} | uint8 counts | {r['ids_per_position']:.1f} | "
                  f"{r['bytes_per_token']:.1f} | {r['read_tokens_per_s']:.3g} |")


if __name__ == "__main__":
    main()
