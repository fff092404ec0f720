"""Online logits (``record_logits:``): a plain LM run records its own targets into a logits store.

The recorded targets are those of the recording run's weights at the step each sample was seen
(checked against ``precompute-logits`` from each step's checkpoint); with frozen weights the store
is byte-identical to a precompute and does not depend on the DP size; a kill -9 and resume ends
with the uninterrupted run's files; a student trains from the recorded store."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_runs import STUDENT, TEACHER, launch_train, run_training

from megadistill.config import (
    CheckpointConfig, ConfigError, DataConfig, KDConfig, OptimizerConfig, ParallelConfig,
    RecordLogitsConfig, RunConfig, TeacherConfig, TrainingConfig, to_dict, validate,
)
from megadistill.schedules import AlphaSchedule
from megadistill.store import format as fmt
from megadistill.store.decode import Shard
from megadistill.store.format import StoreError
from megadistill.store.reader import StoreReader, run_mismatches
from megadistill.testing import run_distributed
from megadistill.testing.processes import kill_9_tree

RECORDER = TEACHER  # the recording run: the tiny teacher
SEQ, G, SPS = 32, 8, 12  # sequence length, global batch, samples per shard (shards straddle steps)
TOP_P, TOP_K = 0.9, 20
# Weights that do not move: an update of 1e-30 is below every weight's float32 rounding.
FROZEN = OptimizerConfig(lr=1e-30, min_lr=0.0, lr_schedule="constant", warmup_fraction=0.0, weight_decay=0.0)


def _record(store, kind="top_p_k", samples_per_shard=SPS, logprob_dtype="fp32", compression=None) -> RecordLogitsConfig:
    return RecordLogitsConfig(store=str(store), kind=kind, top_p=TOP_P, top_k=TOP_K, logprob_dtype=logprob_dtype,
                              compression=compression, samples_per_shard=samples_per_shard)


def _cfg(out, corpus, store, kind="top_p_k", **kw) -> RunConfig:
    prefix, tok = corpus
    cfg = RunConfig(
        name=Path(out).name, output_dir=str(out), model=RECORDER,
        data=DataConfig(data_prefix=prefix, tokenizer_model=tok, seq_length=SEQ, micro_batch_size=4, global_batch_size=G),
        optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_fraction=0.1),
        # Validation between steps: its forwards (samples 0..7 of the validation set) must not be recorded.
        training=TrainingConfig(train_steps=4, eval_interval=2, eval_steps=1, log_interval=1),
        checkpoint=CheckpointConfig(save_interval=1),
        record_logits=_record(store, kind),
    )
    return replace(cfg, **kw)


def _precompute(cfg, kind="top_p_k", logprob_dtype="fp32", compression=None):
    from megadistill.store.precompute import precompute

    return precompute(cfg, progress=False, samples_per_shard=SPS, logprob_dtype=logprob_dtype, kind=kind,
                      draws=cfg.record_logits.draws, compression=compression)


def _precompute_cfg(recording: RunConfig, ckpt, store) -> RunConfig:
    """A precompute over the recording run's samples with its weights from ``ckpt``."""
    return replace(recording, output_dir=str(Path(store).parent / "pre"), record_logits=RecordLogitsConfig(),
                   teacher=TeacherConfig(mode="offline", model=recording.model, checkpoint=str(ckpt), store=str(store)),
                   kd=KDConfig(top_p=TOP_P, top_k=TOP_K, truncation="ghost"))


def _shards(store) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(store).glob("shard-*.bin"))}


def _same_store_but_run(a: dict, b: dict) -> None:
    """Two manifests equal but for the recording run's name, directory and final checkpoint."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    for m in (a, b):
        m.pop("recording")
        m.pop("manifest_sha256")  # over the keys that differ
        t = m["identity"]["teacher"]
        t.pop("path")
        t["recorded_by"].pop("name")
        t["recorded_by"].pop("output_dir")
    assert a == b


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, corpus):
    """A DP=1 recording at a real learning rate, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("recorded")
    cfg = _cfg(root / "run", corpus, root / "store")
    run_distributed(run_training, 1, cfg)
    return cfg, root / "store"


# --------------------------------------------------------------------------- config (pure)


def test_config_names_the_key_it_refuses():
    base = RunConfig(record_logits=RecordLogitsConfig(store="s"))
    validate(base, world_size=1)
    cases = [
        (replace(base, teacher=TeacherConfig(mode="online", checkpoint="c")), "record_logits.store needs teacher.mode=none"),
        (replace(base, data_selection=replace(base.data_selection, scores="x")), "cannot be combined with data_selection"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", kind="topk")), "record_logits.kind"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", top_p=0.0)), "record_logits.top_p"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", top_k=0)), "record_logits.top_k"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", draws=0)), "record_logits.draws"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", samples_per_shard=0)), "record_logits.samples_per_shard"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", logprob_dtype="bf16")), "record_logits.logprob_dtype"),
        (replace(base, record_logits=RecordLogitsConfig(store="s", compression="gzip")), "record_logits.compression"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    # Not recording: the section's other keys are not looked at.
    validate(replace(base, record_logits=RecordLogitsConfig(store=None, top_k=0),
                     teacher=TeacherConfig(mode="online", checkpoint="c")), world_size=1)


# --------------------------------------------------------------------------- recording runs


def test_recorded_targets_are_the_weights_of_the_step_each_sample_was_seen(recorded):
    cfg, store = recorded
    reader = StoreReader(store)
    m = reader.manifest
    assert m["num_samples"] == 4 * G and [s["num_samples"] for s in m["shards"]] == [12, 12, 8]
    assert m["truncation"] == {"top_p": TOP_P, "top_k": TOP_K, "ties": "kept", "temperatures": [1.0]}
    t = m["identity"]["teacher"]
    assert t["recorded_by"]["name"] == "run" and t["steps"]["last"] == 3 and t["model"]["hidden_size"] == 96
    assert m["recording"]["final_checkpoint"].endswith("step_00000004")
    from megadistill.store.inspect_store import teacher_summary

    assert teacher_summary(t).startswith("teacher: recorded while training, by run run (")
    from megadistill.store.inspect_store import info, verify

    assert any(line.startswith("teacher: recorded while training") for line in info(store))  # store info
    assert "OK" in verify(store)[0]  # a recorded store meets the cross-checks of its top-p/top-k too
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json"] + [fmt.shard_name(i) for i in range(3)]

    ckpts = Path(cfg.output_dir) / "checkpoints"
    pre = {}
    for step in (1, 2, 3):
        where = store.parent / f"pre{step}" / "store"
        run_distributed(_precompute, 1, _precompute_cfg(cfg, ckpts / f"step_{step:08d}", where))
        pre[step] = StoreReader(where)
    for step in (1, 2, 3):
        for i in range(step * G, (step + 1) * G):
            ids, lp, res, _ = reader.sample(i)
            want = pre[step].sample(i)
            assert np.array_equal(ids, want[0]), (step, i)
            assert np.allclose(lp, want[1], atol=1e-6, rtol=0) and np.allclose(res, want[2], atol=1e-6), (step, i)
    # The comparison tells the weights apart: step 2's samples are not the step-3 weights' targets.
    later = [pre[3].sample(i) for i in range(2 * G, 3 * G)]
    assert any(not np.array_equal(reader.sample(i)[0], w[0]) or not np.allclose(reader.sample(i)[1], w[1], atol=1e-6)
               for i, w in zip(range(2 * G, 3 * G), later))


@pytest.mark.parametrize("kind,dp,dtype,compression,backend", [
    ("top_p_k", 1, "fp32", None, "megatron"), ("top_p_k", 2, "fp32", None, "megatron"),
    ("top_p_k", 2, "qlog16", "zstd", "megatron"), ("rskd", 2, "fp32", None, "megatron"),
    ("top_p_k", 2, "fp16", None, "deepspeed"),
])
def test_frozen_recording_is_byte_identical_to_a_precompute_at_any_dp(tmp_path, corpus, kind, dp, dtype, compression, backend):
    """Frozen weights see the same logits at every step: the recording equals a precompute from
    the final checkpoint, byte for byte, whatever the DP size, the encoding and the backend."""
    from megadistill.config import DeepSpeedConfig

    cfg = _cfg(tmp_path / "run", corpus, tmp_path / "store", kind=kind, optimizer=replace(FROZEN, backend=backend),
               deepspeed=DeepSpeedConfig(zero_stage=2), checkpoint=CheckpointConfig(save_interval=0),
               record_logits=_record(tmp_path / "store", kind, logprob_dtype=dtype, compression=compression))
    run_distributed(run_training, dp, cfg)
    if backend == "deepspeed":  # a DeepSpeed checkpoint is no teacher: precompute from a Megatron run's
        cfg = replace(cfg, output_dir=str(tmp_path / "megatron"), optimizer=FROZEN,
                      record_logits=_record(tmp_path / "megatron-store", kind, logprob_dtype=dtype))
        run_distributed(run_training, 1, cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000004"
    run_distributed(_precompute, 1, _precompute_cfg(cfg, ckpt, tmp_path / "pre" / "store"), kind=kind,
                    logprob_dtype=dtype, compression=compression)
    recorded, pre = _shards(tmp_path / "store"), _shards(tmp_path / "pre" / "store")
    assert set(recorded) == {fmt.shard_name(i) for i in range(3)}
    assert recorded == pre
    manifest = StoreReader(tmp_path / "store").manifest
    other = StoreReader(tmp_path / "pre" / "store").manifest
    assert manifest["kind"] == kind and manifest["shards"] == other["shards"] and manifest["encoding"] == other["encoding"]
    if kind == "rskd":
        assert manifest["sampling"]["draws"] == 12 and "truncation" not in manifest


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tp2_and_pp2_recordings_match_a_tp1_precompute(tmp_path, corpus, layout):
    """TP: each rank holds a vocabulary shard of the logits, the selection is over the global
    vocabulary. PP: only the last stage's output is logits (the first stage's are hidden states)."""
    tp, pp = (2, 1) if layout == "tp2" else (1, 2)
    cfg = _cfg(tmp_path / "run", corpus, tmp_path / "store", optimizer=FROZEN, checkpoint=CheckpointConfig(save_interval=0),
               parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    run_distributed(run_training, 2, cfg, tp=tp, pp=pp)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000004"
    pre_cfg = replace(_precompute_cfg(cfg, ckpt, tmp_path / "pre" / "store"), parallel=ParallelConfig())
    run_distributed(_precompute, 1, pre_cfg)
    a, b = StoreReader(tmp_path / "store"), StoreReader(tmp_path / "pre" / "store")
    assert a.manifest["encoding"] == b.manifest["encoding"]
    for i in range(4 * G):
        ia, la, ra, _ = a.sample(i)
        ib, lb, rb, _ = b.sample(i)
        assert np.array_equal(ia, ib), i
        assert np.allclose(la, lb, atol=1e-5) and np.allclose(ra, rb, atol=1e-5), i


def test_a_recording_killed_at_dp2_and_resumed_at_dp1_ends_with_the_same_store(tmp_path, corpus, monkeypatch):
    """Shards are global sample ranges and a shard's owner is whichever rank the resumed layout
    gives it: a resume at another DP size finishes the store as an uninterrupted run would."""
    from megadistill.store import recorder
    from megadistill.store.pieces import list_pieces

    cfg = _cfg(tmp_path / "run", corpus, tmp_path / "store", optimizer=FROZEN, checkpoint=CheckpointConfig(save_interval=2))
    record = recorder.LogitsRecorder._record

    def dies_in_step_3(self, batch, logits):
        record(self, batch, logits)
        if int(batch["indices"][0]) // G == 3:
            os._exit(9)  # as kill -9: nothing is cleaned up (the last checkpoint is step 2's)

    monkeypatch.setattr(recorder.LogitsRecorder, "_record", dies_in_step_3)
    with pytest.raises(Exception):
        run_distributed(run_training, 2, cfg)
    monkeypatch.undo()
    store = tmp_path / "store"
    assert not (store / "manifest.json").exists() and (store / fmt.shard_name(0)).is_file()
    assert {first for first, _, _, _ in list_pieces(store / "pending")} >= {12, 16, 20, 24}
    # A finished shard damaged before the resume is trusted by content, not structure: its samples
    # (seen before the checkpoint) cannot be recorded again, so the resume stops, naming it.
    shard0 = store / fmt.shard_name(0)
    good = shard0.read_bytes()
    offset, _ = Shard(good, shard0.name).header["sections"]["logprobs"]
    shard0.write_bytes(good[:offset] + bytes([good[offset] ^ 1]) + good[offset + 1 :])
    with pytest.raises(Exception, match=r"record_logits.store .*shard-000000.bin is not trusted: its bytes do not hash "
                                        r".*samples 0..11 were recorded before the checkpoint"):
        run_distributed(run_training, 1, cfg)
    shard0.write_bytes(good)  # restored from a copy
    run_distributed(run_training, 1, cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_00000004"
    run_distributed(_precompute, 1, _precompute_cfg(cfg, ckpt, tmp_path / "pre" / "store"))
    assert _shards(store) == _shards(tmp_path / "pre" / "store")
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json"] + [fmt.shard_name(i) for i in range(3)]


def test_a_damaged_piece_is_a_store_error_naming_it():
    """Pieces are trusted by their zip CRC-32s: any damaged byte of the data is a ``StoreError``
    naming the piece (before: zipfile's BadZipFile, EOFError or NotImplementedError escaped)."""
    from megadistill.store.encode import SampleTargets
    from megadistill.store.pieces import decode_piece, encode_piece

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=SEQ)
    e = int(counts.sum())
    sample = SampleTargets(b"h" * 16, counts, rng.uniform(0, 0.1, SEQ), rng.integers(0, 512, e), -rng.uniform(0, 5, e))
    data = encode_piece(40, [sample])
    escaped, silent = set(), []
    for pos in range(0, len(data), 5):  # every zip structure and array: ~1/5 of the bytes keeps it short
        damaged = bytearray(data)
        damaged[pos] ^= 0x55
        try:
            first, (got,) = decode_piece(bytes(damaged), "pending/piece-x.bin")
        except StoreError as err:
            assert str(err).startswith("piece pending/piece-x.bin is unreadable or damaged") and "\n" not in str(err)
            continue
        except Exception as err:
            escaped.add(type(err).__name__)
            continue
        # Bytes the data does not depend on (zip timestamps, ...): the same targets come back.
        if first != 40 or any(not np.array_equal(getattr(got, k), getattr(sample, k))
                              for k in ("counts", "residual", "ids", "logprobs")):
            silent.append(pos)
    assert not escaped and not silent, (escaped, silent)


def test_a_store_recorded_for_other_settings_is_refused(tmp_path, corpus, recorded):
    _, store = recorded
    other = _cfg(tmp_path / "other", corpus, store, record_logits=replace(_record(store), top_k=TOP_K + 1),
                 training=TrainingConfig(train_steps=4, eval_interval=4, eval_steps=1))
    with pytest.raises(Exception, match=r"record_logits.store .* another run or other settings \(differs in: .*truncation"):
        run_distributed(run_training, 1, other)
    assert not (tmp_path / "other" / "checkpoints").exists()


def _student(rec_cfg: RunConfig, out, store, teacher_checkpoint=None) -> RunConfig:
    """A student of ``STUDENT`` distilling offline from the store recorded by ``rec_cfg``."""
    return replace(
        rec_cfg, name="student", output_dir=str(out), model=STUDENT, record_logits=RecordLogitsConfig(),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_fraction=0.1),
        teacher=TeacherConfig(mode="offline", model=RECORDER, checkpoint=teacher_checkpoint, store=str(store)),
        kd=KDConfig(top_p=TOP_P, top_k=TOP_K, truncation="ghost", alpha=AlphaSchedule("constant", alpha_max=0.5)),
        checkpoint=CheckpointConfig(save_interval=0),
    )


def test_a_student_trains_from_the_recorded_store(tmp_path, corpus, recorded):
    from megadistill.checkpoint_dir import read_marker
    from megadistill.metrics import read_metrics

    rec_cfg, store = recorded
    student = _student(rec_cfg, tmp_path / "student", store)
    manifest = StoreReader(store).manifest
    assert run_mismatches(manifest, student, 512) == []
    run_distributed(run_training, 2, student)
    # Its checkpoints name the store's teacher: the recording run, with the checkpoint it ended with.
    marker = read_marker(tmp_path / "student" / "checkpoints" / "step_00000004")
    assert marker["teacher_identity"] == {**manifest["identity"]["teacher"], "recording": manifest["recording"]}
    m = read_metrics(tmp_path / "student")
    assert set(m) == {1, 2, 3, 4}
    for s in m:
        # The store's targets enter the objective at α = 0.5. (The KD loss itself grows: the early
        # samples' targets are the recording run's untrained, near-uniform distributions.)
        assert np.isfinite(m[s]["kd loss"]) and m[s]["kd loss"] > 0
        assert abs(m[s]["total loss"] - 0.5 * (m[s]["lm loss"] + m[s]["kd loss"])) < 1e-5, m[s]
    assert m[4]["lm loss"] < m[1]["lm loss"] - 0.15
    # Another truncation than the recording's is refused before training.
    with pytest.raises(Exception, match="kd.top_k"):
        run_distributed(run_training, 1, replace(student, output_dir=str(tmp_path / "s2"), kd=replace(student.kd, top_k=5)))


def test_a_student_naming_a_teacher_must_name_the_recording_run(tmp_path, corpus, recorded):
    """A recorded store's teacher is its recording run: teacher.checkpoint, if given, must be the
    checkpoint that run ended with (by the sha256 of its COMPLETE marker, which the store records)."""
    from megadistill.preflight import _check_store

    rec_cfg, store = recorded
    ckpts = Path(rec_cfg.output_dir) / "checkpoints"
    _check_store(_student(rec_cfg, tmp_path / "s", store, teacher_checkpoint=rec_cfg.output_dir))  # its last checkpoint
    with pytest.raises(ConfigError, match=rf"teacher.checkpoint {ckpts}/step_00000002 \(COMPLETE sha256 \w{{12}}…\) is "
                                          rf"not the teacher whose targets teacher.store {store} holds: run run recorded "
                                          rf"them while training, ending with checkpoint {ckpts.resolve()}/step_00000004"):
        _check_store(_student(rec_cfg, tmp_path / "s", store, teacher_checkpoint=str(ckpts / "step_00000002")))


# --------------------------------------------------------------------------- kill -9 and resume


def test_kill_9_and_resume_records_the_uninterrupted_store(tmp_path, corpus):
    from megadistill.metrics import read_metrics

    steps, nproc = 10, 2
    cfgs = {}
    for name in ("full", "killed"):
        # Dropout: the recorded training forward depends on the restored RNG states too.
        # 10 samples per shard: shard 4 (samples 40..49) straddles the checkpoint at step 6 (sample 48).
        cfg = _cfg(tmp_path / name, corpus, tmp_path / name / "store", model=replace(RECORDER, hidden_dropout=0.1),
                   training=TrainingConfig(train_steps=steps, eval_interval=5, eval_steps=1, log_interval=1),
                   checkpoint=CheckpointConfig(save_interval=3),
                   record_logits=_record(tmp_path / name / "store", samples_per_shard=10))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        cfgs[name] = path
    with open(tmp_path / "full.log", "w") as log:
        assert launch_train(cfgs["full"], log, nproc).wait(timeout=300) == 0, (tmp_path / "full.log").read_text()
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = launch_train(cfgs["killed"], log, nproc)
        deadline = time.time() + 300
        # Kill between checkpoints: after step 7 is logged (last checkpoint at step 6).
        while time.time() < deadline and proc.poll() is None:
            if (killed / "metrics.jsonl").is_file() and max(read_metrics(killed), default=0) >= 7:
                break
            time.sleep(0.05)
        kill_9_tree(proc)
    assert max(read_metrics(killed)) < steps, "the run finished before it could be killed"
    store = killed / "store"
    left = sorted(p.name for p in store.iterdir())
    assert "manifest.json" not in left
    # Shards 0-3 (samples 0..39, steps 0..4) were checkpointed at step 6: finished; shard 4 waits.
    assert {fmt.shard_name(i) for i in range(4)} <= set(left) and fmt.shard_name(4) not in left, left
    for name in left:
        if name.startswith("shard-"):
            Shard((store / name).read_bytes(), name)  # complete, not half-written
    # What the killed process recorded after its checkpoint (samples 48 on) is replaced by other
    # targets, as a resume that is not exact would see: the resumed run's recordings must win,
    # while its pieces of samples 40..47 (before the checkpoint) must be kept and used.
    from megadistill.store.pieces import decode_piece, encode_piece, list_pieces

    pieces = list_pieces(store / "pending")
    assert {first for first, _, _, _ in pieces} >= {40, 44, 48} and {g for _, _, g, _ in pieces} == {0}
    for first, count, _, path in pieces:
        if first >= 48:
            _, samples = decode_piece(path.read_bytes(), path.name)
            for t in samples:
                t.logprobs = t.logprobs - 1.0
            path.write_bytes(encode_piece(first, samples))
    # Half-written files of a kill mid-write (write_atomic's temporary names) must not survive.
    (store / "pending" / ".piece-000000000076-000004-g000000.bin.tmp-99999").write_bytes(b"MDKDSHD1 half")
    (store / ".shard-000005.bin.tmp-99999").write_bytes(b"MDKDSHD1 half")
    with open(tmp_path / "resumed.log", "w") as log:
        assert launch_train(cfgs["killed"], log, nproc).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()

    full = tmp_path / "full" / "store"
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in full.iterdir())
    assert _shards(store) == _shards(full) and len(_shards(full)) == 8
    _same_store_but_run(StoreReader(store).manifest, StoreReader(full).manifest)
