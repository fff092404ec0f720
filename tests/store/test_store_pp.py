"""Precompute under other parallel layouts: a PP=2 (and TP=2) teacher writes what a TP=1 teacher
writes; the top-p-k selection against a plain reference.

The fixtures (corpus, trained teacher checkpoint) are test_store.py's too. Shards here hold 6 samples
at micro-batch 4, so every shard is a run of full micro-batches followed by a shorter one (and
the last shard, 32 = 5·6 + 2, is a single short one): the pipeline schedule is called with two
different micro-batch shapes per shard.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from store_testing import offline_run, store_files

from megadistill.config import ConfigError, ModelConfig, ParallelConfig
from megadistill.losses.config import KDLossConfig
from megadistill.store import format as fmt
from megadistill.store.precompute import select_top_p_k
from megadistill.store.reader import StoreReader
from megadistill.testing import run_distributed

SPS = 6  # samples per shard: not a multiple of the micro-batch (4)


def _precompute(cfg, **kw):
    from megadistill.store.precompute import precompute

    return precompute(cfg, progress=False, samples_per_shard=SPS, **kw)


def _shards(store):
    return {k: v for k, v in store_files(store).items() if k.startswith("shard-")}


@pytest.fixture(scope="module")
def stores_tp1(tmp_path_factory, corpus, teacher_ckpt):
    """TP=1, PP=1 references: fp32 top-p-k and RS-KD-12."""
    root = tmp_path_factory.mktemp("store-pp-ref")
    run_distributed(_precompute, 1, offline_run(root / "a", corpus, teacher_ckpt, root / "top"), logprob_dtype="fp32")
    run_distributed(_precompute, 1, offline_run(root / "b", corpus, teacher_ckpt, root / "rskd"), kind="rskd", draws=12)
    return root / "top", root / "rskd"


def _pp2(out, corpus, ckpt, store):
    return offline_run(out, corpus, ckpt, store, parallel=ParallelConfig(pipeline_model_parallel_size=2))


def test_pp2_precompute_writes_the_tp1_bytes(tmp_path, corpus, teacher_ckpt, stores_tp1):
    top, rskd = stores_tp1
    assert len(_shards(top)) == 6 and StoreReader(top).manifest["num_samples"] == 32
    run_distributed(_precompute, 2, _pp2(tmp_path / "a", corpus, teacher_ckpt, tmp_path / "top"), pp=2, logprob_dtype="fp32")
    run_distributed(_precompute, 2, _pp2(tmp_path / "b", corpus, teacher_ckpt, tmp_path / "rskd"), pp=2, kind="rskd", draws=12)
    # Byte identity, fp32 log-probs included: each stage runs the same layers on the same
    # activations as the unsplit teacher (p2p moves fp32 tensors unchanged), so the logits and
    # everything selected from them are bit-equal. The manifests record the same plan too.
    assert store_files(tmp_path / "top") == store_files(top)
    assert store_files(tmp_path / "rskd") == store_files(rskd)


def test_killed_pp2_precompute_resumes_at_tp1_to_identical_files(tmp_path, corpus, teacher_ckpt, stores_tp1,
                                                                  stop_precompute_after_shards):
    top, _ = stores_tp1
    with stop_precompute_after_shards(2), pytest.raises(Exception, match="stopped after 2 shard"):
        run_distributed(_precompute, 2, _pp2(tmp_path / "a", corpus, teacher_ckpt, tmp_path / "top"), pp=2,
                        logprob_dtype="fp32")
    left = set(store_files(tmp_path / "top"))
    assert fmt.shard_name(1) in left and fmt.shard_name(2) not in left and "manifest.json" not in left
    run_distributed(_precompute, 1, offline_run(tmp_path / "b", corpus, teacher_ckpt, tmp_path / "top"), logprob_dtype="fp32")
    assert store_files(tmp_path / "top") == store_files(top)


def test_tp2_precompute_equals_tp1_within_the_logits_rounding(tmp_path, corpus, teacher_ckpt, stores_tp1):
    """Not byte identity for fp32 top-p-k: TP=2 splits the row-parallel matmuls into two partial
    sums that an all-reduce adds, a different float32 summation order, so the logits differ from
    TP=1's in the last bits (~1e-7 relative) and exact fp32 copies of log-probs derived from them
    differ too. What must not differ: the kept ids, their order and the per-position counts;
    log-probs and residuals agree to 1e-5 (absolute; ~100× the logits' rounding).
    RS-KD draws are integers and do come out byte-identical (test_store.py)."""
    top, _ = stores_tp1
    cfg = offline_run(tmp_path / "a", corpus, teacher_ckpt, tmp_path / "top", parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_distributed(_precompute, 2, cfg, tp=2, logprob_dtype="fp32")
    a, b = StoreReader(top), StoreReader(tmp_path / "top")
    for i in range(32):
        ia, la, ra, _ = a.sample(i)
        ib, lb, rb, _ = b.sample(i)
        assert np.array_equal(ia, ib), i  # ids, their order and (through the -1 pads) the counts
        assert np.array_equal(np.isinf(la), np.isinf(lb)), i
        fin = np.isfinite(la)
        assert np.abs(la[fin] - lb[fin]).max() < 1e-5 and np.abs(ra - rb).max() < 1e-5, i


def test_pp_teacher_layers_must_divide_into_the_stages(tmp_path, corpus):
    from megadistill.store.precompute import precompute

    cfg = _pp2(tmp_path, corpus, str(tmp_path / "no-checkpoint-needed"), tmp_path / "store")
    cfg = replace(cfg, teacher=replace(cfg.teacher, model=ModelConfig(num_layers=3, hidden_size=96, num_attention_heads=4)))
    with pytest.raises(ConfigError, match="teacher.model.num_layers 3 is not divisible by parallel.pipeline_model_parallel_size 2"):
        precompute(cfg, progress=False)


# --------------------------------------------------------------------------- selection vs a reference


def _reference_top_p_k(x: torch.Tensor, cfg: KDLossConfig):
    """The definition, row by row in numpy: kept = logits at or above the online loss's threshold
    (ties kept); log-probs from a float64 log-sum-exp; order by descending log-prob then id."""
    from megadistill.losses.targets import _truncation_threshold

    m = x.amax(-1)
    lse1 = m + torch.log(torch.exp(x - m.unsqueeze(-1)).sum(-1))  # DenseTarget's fp32 normaliser
    thr = _truncation_threshold(x, lse1, cfg, None).numpy() if cfg.truncates else np.full(x.shape[0], -np.inf)
    xd = x.double().numpy()
    out = []
    for row, t in zip(xd, thr):
        lp = row - np.logaddexp.reduce(row)
        ids = np.nonzero(row >= t)[0]
        ids = ids[np.lexsort((ids, -lp[ids]))]
        res = np.exp(lp[row < t]).sum()
        out.append((ids, lp[ids], res))
    return out


def _tied_logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # bf16-rounded: many exact ties, including at the truncation threshold.
    return (scale * torch.randn(rows, vocab, generator=g)).bfloat16().float()


CFGS = [KDLossConfig(top_p=0.95, top_k=50, truncation="ghost"), KDLossConfig(top_p=0.3, top_k=24),
        KDLossConfig(top_p=0.9, top_k=None), KDLossConfig(top_p=1.0, top_k=7)]


def _check_against_reference(ids, lp, res, ref):
    for r, (rid, rlp, rres) in enumerate(ref):
        n = len(rid)
        assert np.array_equal(ids[r, :n].numpy(), rid) and (ids[r, n:] == -1).all(), r
        # 1e-12: the reference's log-sum-exp sums in another order than the float64 normaliser.
        assert np.allclose(lp[r, :n].numpy(), rlp, rtol=0, atol=1e-12) and torch.isinf(lp[r, n:]).all(), r
        assert abs(float(res[r]) - rres) <= 1e-12 + 1e-9 * rres, r


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scale", [0.3, 4.0])
def test_select_top_p_k_matches_the_reference(scale, ties):
    x = _tied_logits(96, 256, scale, seed=int(scale * 10))
    if not ties:
        x = x + 1e-3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    for cfg in CFGS:
        ids, lp, res, _ = select_top_p_k(x, cfg, None)
        assert ids.shape[1] == max(len(r[0]) for r in _reference_top_p_k(x, cfg))
        _check_against_reference(ids, lp, res, _reference_top_p_k(x, cfg))
    ids, lp, res, _ = select_top_p_k(x, KDLossConfig(top_p=1.0, top_k=None), None)  # no truncation: every id
    assert ids.shape == (96, 256) and (res == 0).all()
    assert np.array_equal(np.sort(ids.numpy(), axis=-1), np.tile(np.arange(256), (96, 1)))


def test_a_kept_id_tied_outside_the_candidate_blocks_is_kept():
    """top-4 of 64 searches only the few vocab blocks with the largest maxima; logits equal to the
    4th largest (the threshold) in more blocks than that are all kept too (ties kept), by id."""
    x = -1.0 - torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    x[0, [0, 1, 2]] = torch.tensor([10.0, 9.0, 8.0])
    sevens = [5, 13, 22, 31, 38, 47, 51, 60]
    x[0, sevens] = 7.0
    cfg = KDLossConfig(top_p=1.0, top_k=4)
    ids, lp, res, _ = select_top_p_k(x, cfg, None)
    assert ids[0].tolist() == [0, 1, 2] + sevens and (lp[0, 3:] == lp[0, 3]).all()
    assert ((ids[1:] >= 0).sum(-1) == 4).all() and (ids[1:, 4:] == -1).all()
    _check_against_reference(ids, lp, res, _reference_top_p_k(x, cfg))


def _select_tp2(x, cfgs):
    from megatron.core import parallel_state

    shard = x.chunk(2, dim=-1)[parallel_state.get_tensor_model_parallel_rank()].contiguous()
    return [select_top_p_k(shard, cfg, parallel_state.get_tensor_model_parallel_group()) for cfg in cfgs]


def test_select_top_p_k_tp2_equals_tp1():
    """On the same logits (split in two vocab shards) TP=2 keeps exactly the TP=1 ids in the same
    order (global threshold, ties by id); the log-probs differ only by the float64 normaliser
    being summed per shard (~1e-16)."""
    x = _tied_logits(64, 256, 1.0, seed=3)
    got = run_distributed(_select_tp2, 2, x, CFGS, tp=2)
    for cfg, a, b in zip(CFGS, got[0], got[1], strict=True):
        one = select_top_p_k(x, cfg, None)
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))  # replicated on both ranks
        assert torch.equal(a[0], one[0])
        assert torch.allclose(a[1], one[1], rtol=0, atol=1e-13) and torch.allclose(a[2], one[2], rtol=1e-12, atol=1e-15)
