"""The offline logits store: encoding round trips, precompute (DP/TP layouts, kill + resume),
training from the store against online KD, and every corruption the reader must catch."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from store_testing import kd_config, offline_run, store_files
from tiny_runs import SEQ, TEACHER, run_precompute, run_training, tiny_run

from megadistill.config import KDConfig, ParallelConfig, TeacherConfig, TrainingConfig
from megadistill.store import codec
from megadistill.store import format as fmt
from megadistill.store.decode import Shard
from megadistill.store.encode import SampleTargets, encode_shard
from megadistill.store.format import StoreError
from megadistill.store.reader import StoreReader
from megadistill.testing import run_distributed


# --------------------------------------------------------------------------- encoding (no ranks)


@pytest.mark.parametrize("bits", [1, 9, 17, 32])
def test_ids_pack_to_the_bits_the_vocabulary_needs(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2**bits, size=1001, dtype=np.uint64)
    buf = codec.pack_ids(ids, bits)
    assert len(buf) == (1001 * bits + 7) // 8
    assert np.array_equal(codec.unpack_ids(buf, 1001, bits), ids.astype(np.int64))
    assert codec.id_bits(512) == 9 and codec.id_bits(151_936) == 18 and codec.id_bits(2**32) == 32


def _random_samples(n, vocab, k_max, rng, first=0):
    out = []
    for i in range(n):
        counts = rng.integers(1, k_max + 1, size=SEQ)
        ids, lps, res = [], [], []
        for c in counts:
            ids.append(rng.choice(vocab, size=c, replace=False))
            p = rng.dirichlet(np.ones(c + 1))
            lps.append(np.log(np.sort(p[:c])[::-1]))
            res.append(p[c])
        out.append(SampleTargets(fmt.sample_hash(np.arange(SEQ) + first + i, np.arange(SEQ)), counts,
                                 np.array(res), np.concatenate(ids), np.concatenate(lps)))
    return out


def _decoded(samples, i):
    s = samples[i]
    ids = np.full((SEQ, int(s.counts.max())), -1)
    lp = np.full(ids.shape, -np.inf)
    starts = np.cumsum(s.counts) - s.counts
    for pos, (a, c) in enumerate(zip(starts, s.counts)):
        ids[pos, :c], lp[pos, :c] = s.ids[a : a + c], s.logprobs[a : a + c]
    return ids, lp


def test_fp32_round_trip_is_exact_and_fp16_within_one_ulp():
    rng = np.random.default_rng(0)
    samples = _random_samples(5, 151_936, 40, rng)
    for dtype in ("fp32", "fp16"):
        shard = Shard(encode_shard(100, samples, SEQ, 151_936, dtype), "x")
        for i in range(5):
            ids, lp, res = shard.sample(100 + i)
            want_ids, want_lp = _decoded(samples, i)
            assert np.array_equal(ids, want_ids)
            valid = ids >= 0
            if dtype == "fp32":
                assert np.array_equal(lp[valid], want_lp[valid].astype(np.float32))
                assert np.allclose(res, samples[i].residual, rtol=1e-7, atol=0)
            else:
                # Stated precision: log-probs round down by less than one fp16 ulp (2^-10 relative),
                # so the stored mass never exceeds the true kept mass; residual within 2^-11 relative.
                err = want_lp[valid] - lp[valid]
                assert (err >= 0).all() and (err <= np.abs(want_lp[valid]) * 2**-10 + 2**-24).all()
                assert np.allclose(res, samples[i].residual, rtol=2**-11, atol=2**-24)
    with pytest.raises(StoreError, match="sample 99 is not in shard x"):
        shard.sample(99)


def test_encoding_is_deterministic_and_compact():
    rng = np.random.default_rng(1)
    samples = _random_samples(3, 512, 20, rng)
    a = encode_shard(0, samples, SEQ, 512, "fp16")
    assert a == encode_shard(0, samples, SEQ, 512, "fp16")
    entries = sum(int(s.counts.sum()) for s in samples)
    payload = entries * (9 / 8 + 2) + 3 * SEQ * (1 + 2)  # ids + fp16 log-probs; counts + residual
    assert len(a) < payload + 3 * 16 + 2 * 4 * 8 + 1024


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def store32(tmp_path_factory, corpus, teacher_ckpt):
    root = tmp_path_factory.mktemp("store32")
    cfg = offline_run(root / "pre", corpus, teacher_ckpt, root / "store")
    run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32")
    return root / "store"


def test_store_covers_the_run_with_a_manifest(store32):
    reader = StoreReader(store32)
    m = reader.manifest
    assert m["num_samples"] == 32 and [s["file"] for s in m["shards"]] == [fmt.shard_name(i) for i in range(4)]
    assert m["encoding"]["id_bits"] == 9 and m["truncation"] == {"top_p": 0.3, "top_k": 24, "ties": "kept"}
    assert set(m["identity"]) == {"teacher", "tokenizer_sha256", "dataset"}
    assert m["identity"]["dataset"]["seq_length"] == SEQ and m["identity"]["dataset"]["num_documents"] > 0
    assert set(store_files(store32)) == {"manifest.json"} | {fmt.shard_name(i) for i in range(4)}
    ids, lp, res = reader.sample(13)
    valid = ids >= 0
    assert ids.shape[0] == SEQ and 1 <= valid.sum(-1).min() and valid.sum(-1).max() <= ids.shape[1]
    mass = np.where(valid, np.exp(lp), 0).sum(-1)
    assert np.allclose(mass + res, 1.0, atol=1e-5)


def test_dp2_precompute_writes_the_same_bytes(tmp_path, corpus, teacher_ckpt, store32):
    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store")
    run_distributed(run_precompute, 2, cfg, logprob_dtype="fp32")
    assert store_files(tmp_path / "store") == store_files(store32)


def test_tp2_precompute_equals_tp1(tmp_path, corpus, teacher_ckpt, store32):
    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store",
                      parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_distributed(run_precompute, 2, cfg, tp=2, logprob_dtype="fp32")
    a, b = StoreReader(store32), StoreReader(tmp_path / "store")
    for i in range(32):
        ia, la, ra = a.sample(i)
        ib, lb, rb = b.sample(i)
        assert np.array_equal(ia, ib), i
        assert np.allclose(la, lb, atol=1e-5) and np.allclose(ra, rb, atol=1e-5)


def test_killed_precompute_resumes_to_identical_files(tmp_path, corpus, teacher_ckpt, store32, stop_precompute_after_shards):
    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store")
    with stop_precompute_after_shards(2), pytest.raises(Exception, match="stopped after 2 shard"):
        run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32")
    left = set(store_files(tmp_path / "store"))
    assert "manifest.json" not in left and fmt.shard_name(1) in left and fmt.shard_name(2) not in left
    run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32")
    assert store_files(tmp_path / "store") == store_files(store32)
    # Another truncation is another store: refused, not mixed in.
    other = replace(cfg, kd=kd_config(top_k=None) if False else KDConfig(top_p=0.9, top_k=20, truncation="ghost"))
    with pytest.raises(Exception, match="made for another run"):
        run_distributed(run_precompute, 1, other, logprob_dtype="fp32")


def test_array_tasks_write_the_single_job_bytes(tmp_path, corpus, teacher_ckpt, store32):
    # A job array of 3 tasks over the 4 shards (task 0 takes shards 0 and 3), run out of order and
    # one after another: no manifest until the set is complete, then exactly the single job's files.
    store = tmp_path / "store"
    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, store)
    assert run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32", shard_task=2, shard_tasks=3) == [None]
    assert set(store_files(store)) == {"precompute.json", fmt.shard_name(2)}
    # A task on 2 data-parallel ranks: its two shards, one each.
    assert run_distributed(run_precompute, 2, cfg, logprob_dtype="fp32", shard_task=0, shard_tasks=3) == [None, None]
    assert set(store_files(store)) == {"precompute.json"} | {fmt.shard_name(i) for i in (0, 2, 3)}
    manifest = run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32", shard_task=1, shard_tasks=3)[0]
    assert manifest == StoreReader(store32).manifest
    assert store_files(store) == store_files(store32)
    # A task run again on the finished store (a requeue, say) changes nothing and leaves no plan behind.
    assert run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32", shard_task=0, shard_tasks=3)[0] == manifest
    assert store_files(store) == store_files(store32)
    with pytest.raises(Exception, match="shard task 3 of 3"):
        run_distributed(run_precompute, 1, cfg, logprob_dtype="fp32", shard_task=3, shard_tasks=3)


def test_array_task_from_slurm_variables():
    from megadistill.config import ConfigError
    from megadistill.store.precompute import shard_task_from_env, task_shards

    assert shard_task_from_env({}) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert shard_task_from_env(env) == (1, 4)
    with pytest.raises(ConfigError, match="not 3 consecutive ids"):
        shard_task_from_env({**env, "SLURM_ARRAY_TASK_MAX": "8", "SLURM_ARRAY_TASK_COUNT": "3"})  # --array=4-8:2
    assert task_shards(10, 1, 4) == [1, 5, 9] and task_shards(2, 3, 4) == []
    assert sorted(sum((task_shards(10, t, 4) for t in range(4)), [])) == list(range(10))


@pytest.fixture(scope="module")
def online_metrics(tmp_path_factory, corpus, teacher_ckpt):
    """Per-step metrics of online KD with the stores' truncation (the reference for offline runs)."""
    from megadistill.metrics import read_metrics

    out = tmp_path_factory.mktemp("store-online") / "online"
    run_distributed(run_training, 1, tiny_run(out, corpus, kd=kd_config(),
                                              teacher=TeacherConfig(mode="online", model=TEACHER, checkpoint=teacher_ckpt)))
    return read_metrics(out)


def test_training_from_the_store_equals_online_kd(tmp_path, corpus, teacher_ckpt, store32, online_metrics):
    from megadistill.metrics import read_metrics

    offline = offline_run(tmp_path / "offline", corpus, teacher_ckpt, store32)
    run_distributed(run_training, 1, offline)
    a, b = online_metrics, read_metrics(tmp_path / "offline")
    assert set(a) == set(b) == {1, 2, 3, 4}
    for step in a:
        for key in ("total loss", "kd loss", "lm loss"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])


def test_dp2_student_reads_the_dp1_targets(tmp_path, corpus, teacher_ckpt, store32):
    from megadistill.sampler import ContiguousSampler
    from megadistill.metrics import read_metrics

    reader = StoreReader(store32)
    for step in range(4):
        one = reader.batch(ContiguousSampler(8, 1).indices(step, 0))
        two = [reader.batch(ContiguousSampler(8, 2).indices(step, r)) for r in range(2)]
        k = max(t[0].shape[-1] for t in two)
        cat = np.concatenate([np.pad(t[0], ((0, 0), (0, 0), (0, k - t[0].shape[-1])), constant_values=-1) for t in two])
        assert np.array_equal(cat[..., : one[0].shape[-1]], one[0]) and (cat[..., one[0].shape[-1]:] == -1).all()
    run_distributed(run_training, 1, offline_run(tmp_path / "dp1", corpus, teacher_ckpt, store32))
    run_distributed(run_training, 2, offline_run(tmp_path / "dp2", corpus, teacher_ckpt, store32))
    a, b = read_metrics(tmp_path / "dp1"), read_metrics(tmp_path / "dp2")
    for step in a:
        assert abs(a[step]["total loss"] - b[step]["total loss"]) < 1e-5, (step, a[step], b[step])


def test_deepspeed_student_trains_from_the_store_as_megatron_does(tmp_path, corpus, teacher_ckpt, store32):
    """The store is a teacher source like any other: ZeRO-2 at DP=2 reads the same targets."""
    from megadistill.config import DeepSpeedConfig
    from megadistill.metrics import read_metrics

    ds = offline_run(tmp_path / "ds", corpus, teacher_ckpt, store32,
                     optimizer=replace(tiny_run(tmp_path, corpus).optimizer, backend="deepspeed"),
                     deepspeed=DeepSpeedConfig(zero_stage=2))
    run_distributed(run_training, 2, ds)
    run_distributed(run_training, 1, offline_run(tmp_path / "mg", corpus, teacher_ckpt, store32))
    a, b = read_metrics(tmp_path / "mg"), read_metrics(tmp_path / "ds")
    assert set(a) == set(b) == {1, 2, 3, 4}
    for step in a:
        for key in ("total loss", "kd loss", "lm loss"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def damaged(tmp_path, store32):
    copy = tmp_path / "store"
    shutil.copytree(store32, copy)
    return copy


def test_checksum_mismatch_names_the_shard(damaged):
    path = damaged / fmt.shard_name(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = StoreReader(damaged)
    reader.sample(3)  # other shards still read
    with pytest.raises(StoreError, match=r"shard shard-000001.bin fails its checksum.*samples 8..15"):
        reader.sample(9)


def test_truncated_shard_is_caught_on_open(damaged):
    path = damaged / fmt.shard_name(2)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"shard shard-000002.bin is \d+ bytes.*truncated.*samples 16..23"):
        StoreReader(damaged)


def test_sample_not_in_the_store(store32):
    with pytest.raises(StoreError, match="holds samples 0..31; sample 32 is not in it"):
        StoreReader(store32).sample(32)


def test_token_hash_mismatch_names_shard_and_sample(store32, corpus, teacher_ckpt, tmp_path):
    from megadistill.store.reader import OfflineTeacher

    teacher = OfflineTeacher(store32, 512, SEQ)
    batch = {"indices": torch.tensor([9, 10]), "tokens": torch.zeros(2, SEQ, dtype=torch.long),
             "labels": torch.zeros(2, SEQ, dtype=torch.long)}
    with pytest.raises(StoreError, match=r"shard shard-000001.bin: sample 9's tokens differ"):
        teacher.split(batch, torch.zeros(2, SEQ, 512))


def test_missing_and_mismatched_store_fail_preflight(tmp_path, corpus, teacher_ckpt, store32):
    from megadistill.config import ConfigError, validate
    from megadistill.preflight import _check_store

    with pytest.raises(ConfigError, match="teacher.store is required"):
        validate(tiny_run(tmp_path, corpus, teacher=TeacherConfig(mode="offline")))
    with pytest.raises(ConfigError, match="does not exist"):
        _check_store(offline_run(tmp_path, corpus, teacher_ckpt, tmp_path / "nowhere"))
    _check_store(offline_run(tmp_path, corpus, teacher_ckpt, store32))
    longer = offline_run(tmp_path, corpus, teacher_ckpt, store32, training=TrainingConfig(train_steps=5))
    with pytest.raises(ConfigError, match="holds only 0..31"):
        _check_store(longer)
    other = replace(offline_run(tmp_path, corpus, teacher_ckpt, store32), data=replace(tiny_run(tmp_path, corpus).data, seq_length=16))
    with pytest.raises(ConfigError, match="data.seq_length is 16 but the store was made with 32"):
        _check_store(other)


# --------------------------------------------------------------------------- store info / verify / CLI


def _verify_with_run_data(cfg, store):
    from megadistill.data.datasets import prepare_data
    from megadistill.store.inspect_store import verify

    return verify(store, prepare_data(cfg)[1])


def test_store_info_and_verify(tmp_path, corpus, teacher_ckpt, store32, capsys):
    import argparse

    from megadistill.cli.store import add_commands as _add_store_commands
    from megadistill.store.inspect_store import info, verify

    text = "\n".join(info(store32))
    assert "top_p=0.3 top_k=24" in text and "9-bit ids, fp32" in text and "bytes/token" in text and "samples 0..31" in text
    assert "OK" in verify(store32)[0]
    cfg = offline_run(tmp_path / "v", corpus, teacher_ckpt, store32)
    assert "against the run's dataset" in run_distributed(_verify_with_run_data, 1, cfg, store32)[0][0]
    other = replace(cfg, training=replace(cfg.training, seed=cfg.training.seed + 1))
    with pytest.raises(Exception, match="sample 0: the dataset's tokens differ"):
        run_distributed(_verify_with_run_data, 1, other, store32)

    parser = argparse.ArgumentParser()
    _add_store_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", "info", str(store32)])
    assert args.fn(args) == 0 and "bytes/token" in capsys.readouterr().out
    args = parser.parse_args(["precompute-logits", "run.yaml", "teacher.store=x", "--logprob-dtype", "fp32"])
    assert args.logprob_dtype == "fp32" and args.overrides == ["teacher.store=x"] and not args.zstd
    args = parser.parse_args(["precompute-logits", "run.yaml", "--logprob-dtype", "qlog64", "--zstd"])
    assert args.logprob_dtype == "qlog64" and args.zstd


def test_fp16_store_trains_close_to_fp32(tmp_path, corpus, teacher_ckpt, store32):
    from megadistill.metrics import read_metrics

    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store16")
    run_distributed(run_precompute, 1, cfg)
    size16 = sum(p.stat().st_size for p in (tmp_path / "store16").glob("shard-*"))
    size32 = sum(p.stat().st_size for p in Path(store32).glob("shard-*"))
    assert size16 < 0.7 * size32
    run_distributed(run_training, 1, offline_run(tmp_path / "s16", corpus, teacher_ckpt, tmp_path / "store16"))
    run_distributed(run_training, 1, offline_run(tmp_path / "s32", corpus, teacher_ckpt, store32))
    a, b = read_metrics(tmp_path / "s16"), read_metrics(tmp_path / "s32")
    for step in a:
        assert abs(a[step]["kd loss"] - b[step]["kd loss"]) < 1e-2 * b[step]["kd loss"], (step, a[step], b[step])


# Per-step KD-loss difference from online KD with the same truncation, relative, as FORMAT.md
# states it ("Encodings and their precision"); measured here (top-0.3-24 with a ghost bucket, 4
# steps of a 512-vocab student): fp16 1.9e-3, qlog64 5.8e-5, qlog16 4.3e-4. fp16 is the worst:
# it rounds every log-prob down (a bias the stored residual does not undo), the grids round to
# nearest and the reader rescales them to the stored kept mass.
OFFLINE_VS_ONLINE = {("fp16", None): 5e-3, ("qlog64", "zstd"): 3e-4, ("qlog16", None): 2e-3}


@pytest.mark.parametrize("encoding, compression", list(OFFLINE_VS_ONLINE))
def test_compact_store_trains_close_to_online_kd(tmp_path, corpus, teacher_ckpt, store32, online_metrics,
                                                  encoding, compression):
    from megadistill.store.inspect_store import info
    from megadistill.metrics import read_metrics

    store = tmp_path / "store"
    run_distributed(run_precompute, 1, offline_run(tmp_path / "pre", corpus, teacher_ckpt, store),
                    logprob_dtype=encoding, compression=compression)
    enc = StoreReader(store).manifest["encoding"]
    assert (enc["logprob_dtype"], enc["compression"], enc["residual_dtype"]) == \
        (encoding, compression, "fp16" if encoding == "fp16" else "fp32")
    assert f"{encoding} log-probs" in "\n".join(info(store))
    run_distributed(run_training, 1, offline_run(tmp_path / "student", corpus, teacher_ckpt, store))
    a, b = online_metrics, read_metrics(tmp_path / "student")
    worst = max(abs(a[step]["kd loss"] - b[step]["kd loss"]) / a[step]["kd loss"] for step in a)
    print(f"{encoding}+{compression}: max relative per-step kd-loss difference vs online {worst:.3g}; "
          f"total loss {max(abs(a[s]['total loss'] - b[s]['total loss']) for s in a):.3g}")
    assert worst < OFFLINE_VS_ONLINE[encoding, compression], worst


# --------------------------------------------------------------------------- RS-KD stores


@pytest.fixture(scope="module")
def store_rskd(tmp_path_factory, corpus, teacher_ckpt):
    root = tmp_path_factory.mktemp("store-rskd")
    cfg = offline_run(root / "pre", corpus, teacher_ckpt, root / "store")
    run_distributed(run_precompute, 1, cfg, kind="rskd", draws=12)
    return root / "store"


def test_rskd_tp2_precompute_writes_the_tp1_bytes(tmp_path, corpus, teacher_ckpt, store_rskd):
    m = StoreReader(store_rskd).manifest
    assert m["kind"] == "rskd" and m["sampling"]["draws"] == 12 and "truncation" not in m
    assert m["encoding"]["draw_dtype"] == "|u1"
    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store",
                      parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_distributed(run_precompute, 2, cfg, tp=2, kind="rskd", draws=12)
    # Draws are counts, not floats: the same draws are the same bytes (the TP=2 logits differ from
    # TP=1's by rounding, which moves a draw only if its uniform lies that close to a CDF step).
    assert store_files(tmp_path / "store") == store_files(store_rskd)


def test_rskd_precompute_resumes_identically_and_trains(tmp_path, corpus, teacher_ckpt, store_rskd, stop_precompute_after_shards):
    from megadistill.store.inspect_store import info, verify
    from megadistill.metrics import read_metrics

    cfg = offline_run(tmp_path / "pre", corpus, teacher_ckpt, tmp_path / "store")
    with stop_precompute_after_shards(2), pytest.raises(Exception, match="stopped after 2 shard"):
        run_distributed(run_precompute, 1, cfg, kind="rskd", draws=12)
    with pytest.raises(Exception, match="made for another run"):  # other draws: another store
        run_distributed(run_precompute, 1, cfg, kind="rskd", draws=8)
    run_distributed(run_precompute, 1, cfg, kind="rskd", draws=12)
    assert store_files(tmp_path / "store") == store_files(store_rskd)
    text = "\n".join(info(store_rskd))
    assert "RS-KD, 12 draws" in text and "|u1 draw counts" in text and "OK" in verify(store_rskd)[0]
    ids, lp, res = StoreReader(store_rskd).sample(5)
    valid = ids >= 0
    assert (valid.sum(-1) <= 12).all() and (res == 0).all()
    assert np.allclose(np.where(valid, np.exp(lp), 0).sum(-1), 1.0, atol=1e-6)
    # kd.top_p/top_k are not the store's business (RS-KD is not truncated): any values train.
    run_distributed(run_training, 1, offline_run(tmp_path / "student", corpus, teacher_ckpt, store_rskd))
    got = read_metrics(tmp_path / "student")
    assert set(got) == {1, 2, 3, 4} and all(np.isfinite(got[s]["kd loss"]) for s in got)
