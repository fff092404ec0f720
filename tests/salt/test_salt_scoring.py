"""SALT_DS: per-token teacher loss over top-k targets and the sequence median (hand-built and on a
real tiny GPT teacher at TP/DP layouts), the score directory (resume, identity checks, corruption),
and the selection → phase-1/phase-2 sampler."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import run_training

from megadistill.config import (
    CheckpointConfig, ConfigError, DataConfig, DataSelectionConfig, ModelConfig, OptimizerConfig, ParallelConfig, RunConfig,
    TeacherConfig, TrainingConfig,
)
from megadistill.salt.score import score_logits, sequence_scores, token_losses
from megadistill.salt.scorefile import ScoreFile, ScoreFileError
from megadistill.salt.selection import SaltSampler, check_samples, sampler_for_run, select
from megadistill.sampler import ContiguousSampler, micro_batches
from megadistill.testing import run_distributed

TEACHER = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
SEQ, GBS, STEPS, PART = 32, 8, 4, 8  # 32 scored samples in 4 parts


# --------------------------------------------------------------------------- hand-built case

# Rows are log-probabilities, so each row's logsumexp is 0 and a token's loss is -log p[target].
_P = {"halves": [0.5, 0.25, 0.125, 0.125], "rising": [0.1, 0.2, 0.3, 0.4], "flat": [0.25] * 4}
# (row, target): ids with a strictly larger p than the target -> learnable at top_k = 2 iff < 2.
_SEQ0 = [("halves", 0), ("halves", 1), ("halves", 2), ("rising", 3), ("rising", 2), ("flat", 1)]
_SEQ1 = [("rising", 3), ("rising", 1), ("halves", 0), ("flat", 2), ("halves", 3), ("rising", 2)]


def _hand_case():
    rows = [_SEQ0, _SEQ1]
    logits = torch.tensor(np.log([[_P[r] for r, _ in seq] for seq in rows]), dtype=torch.float64)  # [2, 6, 4]
    labels = torch.tensor([[t for _, t in seq] for seq in rows])
    return logits, labels


def test_hand_built_scores_are_the_hand_computed_medians():
    logits, labels = _hand_case()
    loss, learnable = token_losses(logits.reshape(12, 4), labels.reshape(12), top_k=2)
    want_loss = [-math.log(_P[r][t]) for seq in (_SEQ0, _SEQ1) for r, t in seq]
    assert torch.allclose(loss, torch.tensor(want_loss, dtype=torch.float64), atol=1e-12, rtol=0)
    # halves/2 has two larger ids; rising/1 has two; halves/3 ties with id 2 but two are larger.
    assert learnable.tolist() == [True, True, False, True, True, True] + [True, False, True, True, False, True]
    score, count = score_logits(logits, labels, None, top_k=2, min_learnable_tokens=1)
    # seq 0 learnable losses: ln2, ln4, -ln0.4, -ln0.3, ln4 -> sorted middle (3rd of 5) = -ln 0.3.
    # seq 1: -ln0.4, ln2, ln4, -ln0.3 -> mean of the middle two (-ln0.4 and -ln0.3).
    assert count.tolist() == [5, 4]
    assert abs(score[0].item() - (-math.log(0.3))) < 1e-12
    assert abs(score[1].item() - 0.5 * (-math.log(0.4) - math.log(0.3))) < 1e-12
    # A masked position does not count; too few learnable tokens -> not selectable (NaN).
    mask = torch.ones(2, 6)
    mask[0, 3] = 0  # drops -ln0.4: seq 0 median of ln2, ln4, -ln0.3, ln4 = mean(-ln0.3, ln4)
    score, count = score_logits(logits, labels, mask, top_k=2, min_learnable_tokens=5)
    assert count.tolist() == [4, 4] and torch.isnan(score).all()
    score, _ = score_logits(logits, labels, mask, top_k=2, min_learnable_tokens=4)
    assert abs(score[0].item() - 0.5 * (-math.log(0.3) + math.log(4))) < 1e-12
    # top_k = 1: only targets with no larger id (ties included: flat/1 and flat/2 are learnable).
    _, learnable = token_losses(logits.reshape(12, 4), labels.reshape(12), top_k=1)
    assert learnable.tolist() == [True, False, False, True, False, True] + [True, False, True, True, False, False]


def test_no_learnable_token_scores_nan_and_counts_zero():
    score, count = sequence_scores(torch.rand(3, 5, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.bool))
    assert count.tolist() == [0, 0, 0] and torch.isnan(score).all()


def _hand_case_tp2():
    from megatron.core import parallel_state

    logits, labels = _hand_case()
    r = parallel_state.get_tensor_model_parallel_rank()
    shard = logits[..., 2 * r : 2 * r + 2].reshape(12, 2)  # ids [2r, 2r+2): targets on either shard
    return token_losses(shard, labels.reshape(12), top_k=2, group=parallel_state.get_tensor_model_parallel_group())


def test_hand_built_case_on_two_vocab_shards_equals_one():
    logits, labels = _hand_case()
    want = token_losses(logits.reshape(12, 4), labels.reshape(12), top_k=2)
    for loss, learnable in run_distributed(_hand_case_tp2, 2, tp=2):
        assert torch.allclose(loss, want[0], atol=1e-12, rtol=0) and torch.equal(learnable, want[1])


# --------------------------------------------------------------------------- a real tiny teacher


def _cfg(out, corpus, ckpt=None, scores=None, **kw) -> RunConfig:
    prefix, tok = corpus
    cfg = RunConfig(
        name=Path(out).name, output_dir=str(out), model=TEACHER,
        teacher=TeacherConfig(mode="online" if ckpt else "none", model=TEACHER, checkpoint=ckpt),
        data=DataConfig(data_prefix=prefix, tokenizer_model=tok, seq_length=SEQ, micro_batch_size=4, global_batch_size=GBS),
        optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_fraction=0.1),
        training=TrainingConfig(train_steps=STEPS, eval_interval=STEPS, eval_steps=1, log_interval=1),
        checkpoint=CheckpointConfig(save_interval=0),
        data_selection=DataSelectionConfig(scores=str(scores) if scores else None, top_k=10, min_learnable_tokens=4),
    )
    return replace(cfg, **kw)


def _score(cfg, **kw):
    from megadistill.salt.score import score_data

    return score_data(cfg, progress=False, samples_per_part=PART, **kw)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("salt-teacher")
    # A few steps: the teacher's top-10 then holds some targets and misses others.
    run_distributed(run_training, 1, _cfg(out, corpus, training=TrainingConfig(train_steps=30, eval_interval=30, eval_steps=1)))
    return str(out / "checkpoints")


@pytest.fixture(scope="module")
def scores1(tmp_path_factory, corpus, teacher_ckpt):
    root = tmp_path_factory.mktemp("salt-scores1")
    run_distributed(_score, 1, _cfg(root / "run", corpus, teacher_ckpt, root / "scores"))
    return root / "scores"


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.name != "histogram.png"}


def _teacher_scores_directly(cfg, indices):
    """The reference: the teacher's unsharded logits of ``indices``, scored by the hand-checked
    functions in float64."""
    from megadistill.config import CHECKPOINT_MODEL_PREFIX, padded_vocab_size
    from megadistill.data.datasets import prepare_data
    from megadistill.megatron.gpt import build_gpt
    from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
    from megadistill.checkpoint_identity import resolve_teacher_checkpoint
    from megadistill.megatron.distributed import init_distributed

    init_distributed(cfg)
    tok, ds, _, _ = prepare_data(cfg)
    teacher = freeze(load_teacher_checkpoint(build_gpt(cfg.teacher.model, cfg, padded_vocab_size(tok.vocab_size, 1)),
                                             resolve_teacher_checkpoint(cfg.teacher.checkpoint), CHECKPOINT_MODEL_PREFIX))
    b = micro_batches(ds, indices, len(indices), torch.device("cpu"))[0]
    with torch.no_grad():
        logits = teacher(b["tokens"], b["position_ids"], None).double()
    return score_logits(logits, b["labels"], b["loss_mask"], 10, 1)


def test_scores_match_the_teachers_own_logits_and_are_plausible(scores1, corpus, teacher_ckpt, tmp_path):
    f = ScoreFile(scores1)
    assert f.num_samples == STEPS * GBS and f.scores.dtype == np.float64
    assert set(p.name for p in scores1.iterdir()) == {"manifest.json", "scores.npy", "learnable_tokens.npy",
                                                      "sample_hashes.npy", "histogram.png"}
    assert (scores1 / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = f.manifest
    assert m["scoring"]["top_k"] == 10 and m["identity"]["dataset"]["seq_length"] == SEQ
    assert set(m["identity"]) == {"teacher", "tokenizer_sha256", "dataset"}
    # Some tokens are learnable, not all: the top-10 restriction is doing something.
    assert 0 < f.learnable_tokens.min() and f.learnable_tokens.max() < SEQ
    want, count = run_distributed(_teacher_scores_directly, 1, _cfg(tmp_path, corpus, teacher_ckpt), list(range(8, 16)))[0]
    assert np.array_equal(f.learnable_tokens[8:16], count.numpy())
    assert np.allclose(f.scores[8:16], want.numpy(), atol=1e-5, rtol=0)


def test_dp2_scoring_writes_the_same_files(tmp_path, corpus, teacher_ckpt, scores1):
    run_distributed(_score, 2, _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores"))
    assert _files(tmp_path / "scores") == _files(scores1)


def test_tp2_scoring_equals_tp1(tmp_path, corpus, teacher_ckpt, scores1):
    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores", parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_distributed(_score, 2, cfg, tp=2)
    a, b = ScoreFile(scores1), ScoreFile(tmp_path / "scores")
    assert np.array_equal(a.learnable_tokens, b.learnable_tokens)
    assert np.array_equal(a.sample_hashes, b.sample_hashes)
    assert np.allclose(a.scores, b.scores, atol=1e-5, rtol=0) and np.array_equal(np.isnan(a.scores), np.isnan(b.scores))


def test_pp2_scoring_equals_pp1(tmp_path, corpus, teacher_ckpt, scores1):
    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores", parallel=ParallelConfig(pipeline_model_parallel_size=2))
    run_distributed(_score, 2, cfg, pp=2)
    a, b = ScoreFile(scores1), ScoreFile(tmp_path / "scores")
    assert np.array_equal(a.learnable_tokens, b.learnable_tokens) and np.array_equal(a.sample_hashes, b.sample_hashes)
    assert np.allclose(a.scores, b.scores, atol=1e-5, rtol=0) and np.array_equal(np.isnan(a.scores), np.isnan(b.scores))


def test_tp2_pp2_scoring_equals_tp1(tmp_path, corpus, teacher_ckpt, scores1):
    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores",
               parallel=ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    run_distributed(_score, 4, cfg, tp=2, pp=2)
    a, b = ScoreFile(scores1), ScoreFile(tmp_path / "scores")
    assert np.array_equal(a.learnable_tokens, b.learnable_tokens) and np.array_equal(a.sample_hashes, b.sample_hashes)
    assert np.allclose(a.scores, b.scores, atol=1e-5, rtol=0)


def test_a_teacher_that_does_not_split_into_the_stages_is_refused(tmp_path, corpus, teacher_ckpt):
    from megadistill.salt.score import score_data

    cfg = _cfg(tmp_path, corpus, teacher_ckpt, tmp_path / "s", parallel=ParallelConfig(pipeline_model_parallel_size=3))
    with pytest.raises(ConfigError, match="teacher.model.num_layers 2 is not divisible by parallel.pipeline_model_parallel_size 3"):
        score_data(cfg)


def test_killed_scoring_resumes_to_identical_files(tmp_path, corpus, teacher_ckpt, scores1, stop_scoring_after_parts):
    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores")
    with stop_scoring_after_parts(2), pytest.raises(Exception, match="stopped after 2 part"):
        run_distributed(_score, 1, cfg)
    left = {p.name for p in (tmp_path / "scores").iterdir()}
    assert left == {"plan.json", "part-000000.npz", "part-000001.npz"}
    # A damaged part is redone, not trusted.
    part = tmp_path / "scores" / "part-000001.npz"
    part.write_bytes(part.read_bytes()[:-40])
    run_distributed(_score, 1, cfg)
    assert _files(tmp_path / "scores") == _files(scores1)
    # Killed after the manifest, before its clean-up: the next call finds it finished and tidies.
    (tmp_path / "scores" / "part-000003.npz").write_bytes(b"stale")
    (tmp_path / "scores" / "plan.json").write_text("{}")
    run_distributed(_score, 1, cfg)
    assert _files(tmp_path / "scores") == _files(scores1)
    # Another top_k is another scoring: refused, not mixed in.
    other = replace(cfg, data_selection=replace(cfg.data_selection, top_k=5))
    with pytest.raises(Exception, match="made for another run.*scoring.top_k"):
        run_distributed(_score, 1, other)


# --------------------------------------------------------------------------- selection and sampler


def _sel(**kw):
    return DataSelectionConfig(min_learnable_tokens=2, **kw)


def test_selection_kinds_pick_the_ranks_they_say():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    scores[[3, 50]] = np.nan
    scores[7] = scores[8]  # a tie, broken by index
    counts = rng.integers(0, 20, size=200)
    ok = np.flatnonzero(np.isfinite(scores) & (counts >= 2))
    top = select(scores, counts, _sel(select="top_fraction", fraction=0.25))
    k = round(0.25 * ok.size)
    assert top.indices.size == k and np.all(np.diff(top.indices) > 0)
    assert set(top.indices) <= set(ok) and scores[top.indices].min() >= np.sort(scores[ok])[-k]
    band = select(scores, counts, _sel(select="band", low_quantile=0.2, high_quantile=0.6))
    lo, hi = round(0.2 * ok.size), round(0.6 * ok.size)
    order = ok[np.lexsort((ok, scores[ok]))]
    assert np.array_equal(band.indices, np.sort(order[lo:hi]))
    assert band.low_score == scores[order[lo]] and band.high_score == scores[order[hi - 1]]
    with pytest.raises(ScoreFileError, match="min_learnable_tokens=50"):
        select(scores, counts, DataSelectionConfig(min_learnable_tokens=50))
    with pytest.raises(ScoreFileError, match="select no sample"):
        select(np.arange(3.0), np.full(3, 5), _sel(select="band", low_quantile=0.1, high_quantile=0.12))


def test_sampler_is_independent_of_dp_size_and_cycles_then_switches():
    selected = [2, 5, 11, 17, 23, 31]
    one = SaltSampler(selected, 4, 1, phase1_steps=3)
    two = SaltSampler(selected, 4, 2, phase1_steps=3)
    assert one.cycles == 2.0
    for step in range(6):
        assert list(one.indices(step, 0)) == list(two.indices(step, 0)) + list(two.indices(step, 1))
    assert [list(one.indices(s, 0)) for s in range(3)] == [[2, 5, 11, 17], [23, 31, 2, 5], [11, 17, 23, 31]]
    assert list(one.indices(3, 0)) == list(ContiguousSampler(4, 1).indices(3, 0)) == [12, 13, 14, 15]


def _recording(ds):
    class Recording:
        """The run's dataset, remembering which samples were read."""

        def __init__(self):
            self.read = []

        def __getitem__(self, i):
            self.read.append(int(i))
            return ds[i]

        def __len__(self):
            return len(ds)

    return Recording()


def _train_dataset(cfg):
    from megadistill.data.tokenizer import SentencePieceTokenizer
    from megadistill.data.datasets import build_gpt_datasets

    d = cfg.data
    train, _ = build_gpt_datasets(d.data_prefix, SentencePieceTokenizer(d.tokenizer_model), d.seq_length, d.split,
                                  (STEPS * GBS, GBS), cfg.training.seed, cache_dir=str(Path(cfg.output_dir) / "cache"))
    return train


@pytest.mark.parametrize("kind", [dict(select="top_fraction", fraction=0.25), dict(select="band", low_quantile=0.25, high_quantile=0.5)])
def test_phase1_reads_only_selected_samples_at_dp1_and_dp2(tmp_path, corpus, teacher_ckpt, scores1, kind):
    cfg = _cfg(tmp_path, corpus, teacher_ckpt, scores1)
    cfg = replace(cfg, data_selection=replace(cfg.data_selection, **kind))
    f = ScoreFile(scores1)
    chosen = select(f.scores, f.learnable_tokens, cfg.data_selection)
    assert 2 <= chosen.indices.size <= 8  # a quarter of the (at most 32) selectable samples
    ds = _train_dataset(cfg)
    reads = {}
    with pytest.warns(UserWarning, match="cycles over the selection"):
        for dp in (1, 2):
            sampler = sampler_for_run(cfg, dp, phase1_steps=2, dataset=ds)
            rec = _recording(ds)
            per_step = []
            for step in range(STEPS):
                got = []
                for r in range(dp):
                    got += [int(i) for b in micro_batches(rec, sampler.indices(step, r), 4, torch.device("cpu")) for i in b["indices"]]
                per_step.append(got)
            reads[dp] = per_step
            assert set(rec.read[: 2 * GBS]) <= set(chosen.indices.tolist())
    assert reads[1] == reads[2]
    sel = chosen.indices.tolist()
    assert reads[1][0] + reads[1][1] == [sel[j % len(sel)] for j in range(2 * GBS)]  # in order, cycled
    assert reads[1][2:] == [list(range(16, 24)), list(range(24, 32))]  # phase 2: the full data


def test_no_selection_or_resumed_after_phase1_needs_no_score_file(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus)
    assert isinstance(sampler_for_run(cfg, 2, phase1_steps=3), ContiguousSampler)
    gone = replace(cfg, data_selection=replace(cfg.data_selection, scores=str(tmp_path / "nowhere")))
    assert isinstance(sampler_for_run(gone, 2, phase1_steps=3, start_step=3), ContiguousSampler)
    with pytest.raises(ScoreFileError, match="teacher.checkpoint is required"):
        sampler_for_run(gone, 2, phase1_steps=3)


# --------------------------------------------------------------------------- mismatch and corruption


@pytest.fixture
def scores_copy(tmp_path, scores1):
    copy = tmp_path / "scores"
    shutil.copytree(scores1, copy)
    return copy


def test_run_mismatches_are_named(tmp_path, corpus, teacher_ckpt, scores1):
    base = _cfg(tmp_path / "run", corpus, teacher_ckpt, scores1)
    sampler_for_run(base, 1, phase1_steps=1)  # the scoring run itself passes
    cases = {
        r"data.seed \(or training.seed\) is 7": replace(base, training=replace(base.training, seed=7)),
        "data.train_samples is 64 but the data was scored with None": replace(base, data=replace(base.data, train_samples=64)),
        "data.seq_length is 16": replace(base, data=replace(base.data, seq_length=16)),
        r"trains on 40 samples .* but 32 were scored": replace(base, training=replace(base.training, train_steps=5)),
        "data_selection.top_k is 5": replace(base, data_selection=replace(base.data_selection, top_k=5)),
        "teacher.model differs": replace(base, teacher=replace(base.teacher, model=replace(TEACHER, ffn_hidden_size=128))),
    }
    for message, cfg in cases.items():
        with pytest.raises(ScoreFileError, match=f"was not made for this run: .*{message}"):
            sampler_for_run(cfg, 1, phase1_steps=1)
    # Another teacher's weights (one checkpoint file differs) and another tokenizer file.
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_ckpt, other)
    victim = max((p for p in other.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(ScoreFileError, match="is not the teacher that scored the data"):
        sampler_for_run(replace(base, teacher=replace(base.teacher, checkpoint=str(other))), 1, phase1_steps=1)
    tok = tmp_path / "tok.model"
    tok.write_bytes(Path(corpus[1]).read_bytes() + b"\0")
    with pytest.raises(ScoreFileError, match="tokenizer .* is not the one the data was scored with"):
        sampler_for_run(replace(base, data=replace(base.data, tokenizer_model=str(tok))), 1, phase1_steps=1)


def test_sample_hash_check_catches_other_data(tmp_path, corpus, teacher_ckpt, scores1):
    cfg = _cfg(tmp_path, corpus, teacher_ckpt, scores1)
    f = ScoreFile(scores1)
    check_samples(f, _train_dataset(cfg), range(32))
    other = _train_dataset(replace(cfg, training=replace(cfg.training, seed=99)))
    with pytest.raises(ScoreFileError, match="sample 0's tokens differ"):
        check_samples(f, other, range(32))


def test_corrupt_truncated_or_incomplete_score_files_fail_clearly(scores_copy, tmp_path, corpus, teacher_ckpt):
    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, scores_copy)
    path = scores_copy / "scores.npy"
    good = path.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x40  # a flipped bit in one score
    path.write_bytes(bytes(data))
    with pytest.raises(ScoreFileError, match="scores.npy fails its checksum"):
        sampler_for_run(cfg, 1, phase1_steps=1)
    path.write_bytes(good[:-8])
    with pytest.raises(ScoreFileError, match="scores.npy fails its checksum"):
        ScoreFile(scores_copy)
    path.write_bytes(good)
    ScoreFile(scores_copy)
    (scores_copy / "learnable_tokens.npy").unlink()
    with pytest.raises(ScoreFileError, match="learnable_tokens.npy is missing"):
        ScoreFile(scores_copy)
    (scores_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ScoreFileError, match="not readable JSON"):
        ScoreFile(scores_copy)
    (scores_copy / "manifest.json").unlink()
    (scores_copy / "plan.json").write_text("{}")
    with pytest.raises(ScoreFileError, match="has no manifest.json .*in progress or was killed"):
        ScoreFile(scores_copy)


def test_preflight_and_config_errors_name_the_key(tmp_path, corpus, teacher_ckpt, scores1):
    from megadistill.config import validate
    from megadistill.preflight import _check_scores

    _check_scores(_cfg(tmp_path, corpus, teacher_ckpt, scores1))
    with pytest.raises(ConfigError, match=r"data_selection.scores: .*nowhere does not exist .*score-data"):
        _check_scores(_cfg(tmp_path, corpus, teacher_ckpt, tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "plan.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no finished scores.*run megadistill score-data again"):
        _check_scores(_cfg(tmp_path, corpus, teacher_ckpt, tmp_path / "half"))
    base = _cfg(tmp_path, corpus)
    bad = {
        "data_selection.fraction must be in": dict(fraction=0.0),
        "data_selection.low_quantile must be in": dict(low_quantile=1.0),
        r"data_selection.high_quantile must be in \(data_selection.low_quantile=0.5": dict(low_quantile=0.5, high_quantile=0.5),
        "data_selection.top_k must be > 0": dict(top_k=0),
        "data_selection.min_learnable_tokens 33 exceeds data.seq_length 32": dict(min_learnable_tokens=33),
        "data_selection.select: 'bottom' is not one of": dict(select="bottom"),
    }
    for message, kw in bad.items():
        with pytest.raises(ConfigError, match=message):
            validate(replace(base, data_selection=replace(base.data_selection, **kw)))


# --------------------------------------------------------------------------- command line


def _cli(argv):
    from megadistill.cli import main

    return main(argv)


def test_score_data_command_writes_then_only_redraws(tmp_path, corpus, teacher_ckpt, scores1, capfd):
    import yaml

    from megadistill.config import to_dict

    cfg = _cfg(tmp_path / "run", corpus, teacher_ckpt, tmp_path / "scores")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    argv = ["score-data", str(tmp_path / "run.yaml"), "--no-progress", f"--samples-per-part={PART}"]
    assert run_distributed(_cli, 1, argv) == [0]
    assert "wrote" in capfd.readouterr().out and _files(tmp_path / "scores") == _files(scores1)
    stamp = (tmp_path / "scores" / "scores.npy").stat().st_mtime_ns
    png = (tmp_path / "scores" / "histogram.png").read_bytes()
    assert run_distributed(_cli, 1, argv + ["data_selection.select=band"]) == [0]
    assert (tmp_path / "scores" / "scores.npy").stat().st_mtime_ns == stamp  # not rescored
    assert (tmp_path / "scores" / "histogram.png").read_bytes() != png  # the new band drawn
    missing = ["score-data", str(tmp_path / "run.yaml"), "--no-progress", "data_selection.scores=null"]
    assert run_distributed(_cli, 1, missing) == [2]
    assert "data_selection.scores is required" in capfd.readouterr().err


def test_histogram_survives_a_selection_that_picks_nothing(tmp_path):
    from megadistill.salt.histogram import draw_histogram

    cfg = RunConfig(data_selection=DataSelectionConfig(select="band", low_quantile=0.1, high_quantile=0.12, min_learnable_tokens=1))
    path = draw_histogram(tmp_path, np.arange(3.0), np.full(3, 5), cfg)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert draw_histogram(tmp_path / "none", np.full(3, np.nan), np.zeros(3), cfg) is None
