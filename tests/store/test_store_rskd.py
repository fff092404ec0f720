"""RS-KD targets (random-sampling KD) and the offline reader's prefetch, without a teacher run:
encoding round trips, the sampler's layout independence and unbiasedness (statistical tests with
fixed seeds), and prefetched targets equal to synchronously decoded ones. The precompute itself
(TP=1 vs TP=2, training from an RS-KD store) is tested in ``test_store.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megadistill.losses.config import KDLossConfig
from megadistill.losses.kd import vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from megadistill.store import codec
from megadistill.store import format as fmt
from megadistill.store import writer
from megadistill.store.decode import Shard
from megadistill.store.encode import SampleTargets, encode_shard
from megadistill.store.format import StoreError
from megadistill.store.precompute import rskd_uniforms, sample_rskd, select_top_p_k
from megadistill.testing import run_distributed

SEQ = 16


def _teacher_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(rows, vocab, generator=g, dtype=torch.float64).float()


def _rskd_samples(n: int, vocab: int, draws: int, first: int = 0, seed: int = 0) -> list[SampleTargets]:
    logits = _teacher_logits(n * SEQ, vocab, seed)
    u = torch.from_numpy(rskd_uniforms(seed, np.repeat(np.arange(first, first + n), SEQ), np.tile(np.arange(SEQ), n), draws))
    ids, cnt = sample_rskd(logits, u, None)
    ids, cnt = ids.reshape(n, SEQ, -1).numpy(), cnt.reshape(n, SEQ, -1).numpy()
    out = []
    for j in range(n):
        valid = ids[j] >= 0
        out.append(SampleTargets(fmt.sample_hash(np.arange(SEQ) + first + j, np.arange(SEQ)), valid.sum(-1), None,
                                 ids[j][valid], None, draws=cnt[j][valid]))
    return out


# --------------------------------------------------------------------------- encoding


def test_rskd_shard_round_trip_is_exact():
    draws = 12
    samples = _rskd_samples(4, 151_936, draws, first=40)
    buf = encode_shard(40, samples, SEQ, 151_936, None, kind="rskd", num_draws=draws)
    assert buf == encode_shard(40, samples, SEQ, 151_936, None, kind="rskd", num_draws=draws)
    shard = Shard(buf, "r")
    assert shard.kind == "rskd" and shard.header["draw_dtype"] == "|u1" and shard.header["logprob_dtype"] is None
    for j, s in enumerate(samples):
        ids, d = shard.sample_draws(40 + j)
        assert np.array_equal(ids, s.ids) and np.array_equal(d, s.draws)
        dense_ids, lp, res, tails = shard.sample(40 + j)
        valid = dense_ids >= 0
        assert np.array_equal(dense_ids[valid], s.ids) and (res == 0).all() and tails is None
        # The stored target is the empirical distribution count / N, exactly (up to float32 rounding of its log).
        assert np.allclose(np.exp(lp[valid].astype(np.float64)), s.draws / draws, rtol=1e-6, atol=0)
        assert np.allclose(np.where(valid, np.exp(lp), 0).sum(-1), 1.0, atol=1e-6)
        # Canonical order: descending count, ties by ascending id.
        starts = np.cumsum(s.counts) - s.counts
        for a, c in zip(starts, s.counts):
            key = list(zip(-s.draws[a : a + c], s.ids[a : a + c]))
            assert key == sorted(key) and len(set(s.ids[a : a + c])) == c
    with pytest.raises(ValueError, match="sum to 12"):
        bad = SampleTargets(samples[0].hash, samples[0].counts, None, samples[0].ids, None, draws=samples[0].draws + 1)
        encode_shard(0, [bad], SEQ, 151_936, None, kind="rskd", num_draws=draws)


def test_rskd_bytes_per_token_at_12_draws():
    # A flat-ish teacher draws ~12 distinct ids a position: the worst case for the size.
    vocab, draws, n = 32_000, 12, 4
    samples = _rskd_samples(n, vocab, draws)
    buf = encode_shard(0, samples, SEQ, vocab, None, kind="rskd", num_draws=draws)
    per_token = len(buf) / (n * SEQ)
    entries = sum(int(s.counts.sum()) for s in samples) / (n * SEQ)
    # ids (15 bits) + uint8 draw counts per entry, a uint8 distinct count per position, the sample hash.
    assert per_token <= entries * (15 + 8) / 8 + 1 + 16 / SEQ + 1200 / (n * SEQ)
    assert entries * (15 + 8) / 8 + 1 + 16 / 1024 <= 40  # at a real sequence length: <= 40 B/token


# --------------------------------------------------------------------------- sampling


def test_uniforms_depend_only_on_seed_sample_position_draw():
    u = rskd_uniforms(7, [3, 3, 9], [0, 1, 0], 5)
    assert u.shape == (3, 5) and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(rskd_uniforms(7, [9], [0], 5)[0], u[2])  # not the batch it is drawn in
    assert np.array_equal(rskd_uniforms(7, [3], [1], 3)[0], u[1, :3])  # nor the number of draws
    assert not np.array_equal(rskd_uniforms(8, [3], [0], 5)[0], u[0])
    assert len(np.unique(u)) == u.size


def _sample_on_ranks(logits, u):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    v = logits.shape[-1] // tp
    return sample_rskd(logits[:, rank * v : (rank + 1) * v], u, group)


def test_rskd_draws_are_the_same_at_tp2():
    logits = _teacher_logits(64, 96, seed=3)
    u = torch.from_numpy(rskd_uniforms(1, np.arange(64), np.zeros(64), 12))
    ref = sample_rskd(logits, u, None)
    for got in run_distributed(_sample_on_ranks, 2, logits, u, tp=2):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_mean_of_rskd_targets_converges_to_the_teacher():
    """M independent RS-KD targets (N = 12 draws each) at fixed teacher positions: each id's mean
    empirical probability is within 4.5 standard errors sqrt(p(1-p)/(M·N)) of the teacher's p, and
    the squared z-scores average 1 ± 0.2 (a biased sampler or wrong variance fails that).

    Tolerance: 4.5σ on each of 240 cells is a family-wise false-alarm rate of ~0.2 % for a correct
    sampler (a plain 4σ would be ~1.5 %: seed 11 has one cell at 4.2σ, which a 10× larger M shows
    to be chance, not bias — that cell falls to 3.2σ instead of growing to 13σ)."""
    vocab, positions, m, draws = 40, 6, 3000, 12
    logits = _teacher_logits(positions, vocab, seed=5)
    p = torch.softmax(logits.double(), -1).numpy()
    rows = logits.repeat(m, 1)  # row r·positions + i is draw set r of position i
    u = torch.from_numpy(rskd_uniforms(11, np.repeat(np.arange(m), positions), np.tile(np.arange(positions), m), draws))
    ids, cnt = sample_rskd(rows, u, None)
    q = np.zeros((m * positions, vocab))
    valid = ids >= 0
    np.add.at(q, (np.nonzero(valid.numpy())[0], ids[valid].numpy()), cnt[valid].numpy() / draws)
    mean = q.reshape(m, positions, vocab).mean(0)
    se = np.sqrt(p * (1 - p) / (m * draws))
    z = np.abs(mean - p) / np.maximum(se, 1e-12)
    assert z.max() < 4.5, (z.max(), np.unravel_index(z.argmax(), z.shape))
    assert 0.8 < (z**2).mean() < 1.2, (z**2).mean()
    assert np.abs(mean - p).max() < 4.5 * se.max()


def _grad(student: torch.Tensor, loss_fn) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    loss_fn(z).sum().backward()
    return z.grad


def test_rskd_gradient_is_unbiased_and_top_k_is_not():
    """The forward-KL gradient w.r.t. the student logits is ``softmax(z) - q``: with RS-KD targets its
    mean over many draws approaches the dense gradient (within 4.5 standard errors per element, as
    in the test above), while a
    renormalised top-k target's gradient stays far off (its bias)."""
    vocab, positions, m, draws = 40, 4, 2000, 12
    teacher = _teacher_logits(positions, vocab, seed=9)
    student = _teacher_logits(positions, vocab, seed=10)
    cfg = KDLossConfig(loss="forward_kl")
    dense = _grad(student[:, None], lambda z: vocab_parallel_kd_loss(z, teacher[:, None], cfg, group=None))[:, 0]

    u = torch.from_numpy(rskd_uniforms(2, np.repeat(np.arange(m), positions), np.tile(np.arange(positions), m), draws))
    ids, cnt = sample_rskd(teacher.repeat(m, 1), u, None)
    lp = torch.where(ids >= 0, torch.log(cnt.double() / draws), torch.tensor(-np.inf, dtype=torch.float64)).float()
    rows = student.repeat(m, 1)[:, None]  # [m·positions, 1, v]: every draw set a token of its own
    g = _grad(rows, lambda z: vocab_parallel_sparse_kd_loss(z, ids[:, None], lp[:, None], cfg, group=None))[:, 0]
    mean = g.reshape(m, positions, vocab).mean(0)
    p = torch.softmax(teacher.double(), -1)
    se = torch.sqrt(p * (1 - p) / (m * draws))
    err = (mean.double() - dense.double()).abs()
    assert (err < 4.5 * se + 1e-6).all(), float((err / se).max())
    assert 0.7 < float(((err / se) ** 2).mean()) < 1.3

    top_ids, top_lp, _, _ = select_top_p_k(teacher, KDLossConfig(top_k=5), None)
    biased = _grad(student[:, None], lambda z: vocab_parallel_sparse_kd_loss(
        z, top_ids[:, None], top_lp.float()[:, None], cfg, group=None))[:, 0]
    bias = (biased.double() - dense.double()).abs()
    # It fails the tolerance the RS-KD mean meets, and not by a little: its largest error is ~37×
    # the largest standard error of the RS-KD mean (0.116 vs 0.0032), and no amount of averaging helps.
    assert (bias > 4.5 * se + 1e-6).sum() >= positions
    assert bias.max() > 20 * se.max(), (float(bias.max()), float(se.max()))


# --------------------------------------------------------------------------- prefetch


def _make_store(root: Path, kind: str, n: int = 24, per_shard: int = 8, vocab: int = 300) -> Path:
    """A small finished store written through the writer (no teacher)."""
    rng = np.random.default_rng(0)
    plan = {"format_version": fmt.FORMAT_VERSION, "kind": kind, "identity": {"dataset": {"seq_length": SEQ}},
            "encoding": {"vocab_size": vocab, "id_bits": codec.id_bits(vocab)}, "num_samples": n,
            "samples_per_shard": per_shard,
            **({"sampling": {"draws": 12, "temperature": 1.0}} if kind == "rskd" else {"truncation": {"temperatures": [1.0]}})}
    writer.begin(root, plan)
    for i, (first, count) in enumerate(writer.shard_ranges(n, per_shard)):
        if kind == "rskd":
            samples = _rskd_samples(count, vocab, 12, first=first, seed=i)
            data = encode_shard(first, samples, SEQ, vocab, None, kind="rskd", num_draws=12)
        else:
            samples = []
            for j in range(first, first + count):
                c = rng.integers(1, 9, size=SEQ)
                ids = np.concatenate([rng.choice(vocab, size=k, replace=False) for k in c])
                pr = np.concatenate([np.sort(rng.dirichlet(np.ones(k + 1))[:k])[::-1] for k in c])
                samples.append(SampleTargets(fmt.sample_hash(np.arange(SEQ) + j, np.arange(SEQ)), c,
                                             rng.uniform(0, 0.1, SEQ), ids, np.log(pr)))
            data = encode_shard(first, samples, SEQ, vocab, "fp16")
        writer.write_atomic(root / fmt.shard_name(i), data)
    writer.finish(root, plan)
    return root


def _batch(indices):
    idx = torch.tensor(indices)
    return {"indices": idx, "tokens": torch.arange(SEQ)[None] + idx[:, None], "labels": torch.arange(SEQ).repeat(len(indices), 1)}


@pytest.mark.parametrize("kind", ["top_p_k", "rskd"])
def test_prefetched_targets_equal_synchronous_ones(tmp_path, kind):
    from megadistill.sampler import ContiguousSampler
    from megadistill.store.reader import OfflineTeacher

    store = _make_store(tmp_path / "s", kind)
    out = torch.zeros(1)
    # DP=2, global batch 8, micro-batch 2: rank 1 reads [4..7], [12..15], [20..23] (jumps between steps).
    sampler = ContiguousSampler(8, 2)
    order = [list(sampler.indices(step, 1))[a : a + 2] for step in range(3) for a in (0, 2)]
    order += [[0, 1], [5, 9]]  # an unpredicted micro-batch and a non-contiguous one
    sync, pre = OfflineTeacher(store, 300, SEQ, prefetch=0), OfflineTeacher(store, 300, SEQ, prefetch=2)
    for indices in order:
        a, b = sync.split(_batch(indices), out)[1], pre.split(_batch(indices), out)[1]
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs), indices
        # The stored residual travels with the targets (none for RS-KD: nothing was truncated).
        assert (a.residual is None) == (b.residual is None) == (kind == "rskd")
        assert kind == "rskd" or torch.equal(a.residual, b.residual)
    # After the first step the pattern (2 micro-batches, then a jump of 4) is known: all hits there.
    assert pre.hits >= 3 and sync.hits == 0
    # Prefetched targets are still checked against the batch's own tokens.
    bad = _batch([6, 7])
    bad["tokens"] = bad["tokens"] + 1
    pre.split(_batch([4, 5]), out)
    with pytest.raises(StoreError, match="sample 6's tokens differ"):
        pre.split(bad, out)
    pre.close()


@pytest.mark.parametrize("lasting", [False, True], ids=["transient", "lasting"])
def test_a_failed_prefetch_is_raised_where_its_shard_is_needed_naming_it(tmp_path, monkeypatch, lasting):
    """A read failure in the prefetch thread surfaces in the training thread, as a StoreError
    naming the shard file, when that micro-batch is asked for: not swallowed and read again
    synchronously (which hid a transient failure and lost the shard's name from a lasting one)."""
    import re
    import threading

    from megadistill.store.reader import OfflineTeacher, StoreReader

    store = _make_store(tmp_path / "s", "top_p_k")  # 24 samples, 8 per shard: shard 1 holds 8..15
    real_open, failed_in = StoreReader._open, []

    def open_shard(reader, index):
        if index == 1 and (lasting or not failed_in):
            failed_in.append(threading.current_thread().name)
            raise OSError("injected read error")
        return real_open(reader, index)

    monkeypatch.setattr(StoreReader, "_open", open_shard)
    pre, out = OfflineTeacher(store, 300, SEQ, prefetch=2), torch.zeros(1)
    try:
        for indices in ([0, 1], [2, 3], [4, 5], [6, 7]):  # shard 0; [8, 9] is prefetched meanwhile
            pre.split(_batch(indices), out)
        with pytest.raises(StoreError, match=re.escape(fmt.shard_name(1)) + ".*OSError: injected read error") as raised:
            pre.split(_batch([8, 9]), out)
    finally:
        pre.close()
    assert isinstance(raised.value.__cause__, OSError)
    # It was the prefetch thread's failure, raised once -- not a synchronous retry's.
    assert failed_in[0].startswith("megadistill-store-prefetch") and pre.misses == 1
