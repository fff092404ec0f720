"""Preflight: the checks that read the run's files and checkpoints, kept out of the pure schema.

A config naming files that do not exist here passes ``validate`` (it can be checked anywhere) and
fails ``preflight`` with the same messages ``load_config`` always gave.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from tiny_runs import TEACHER

from megadistill.config import ConfigError, DataConfig, RunConfig, TeacherConfig, config_from_dict, validate
from megadistill.preflight import preflight
from megadistill.checkpoint_identity import resolve_teacher_checkpoint
from megadistill.testing import run_distributed


def _save_tiny_teacher(path: str) -> None:
    from megadistill.megatron.teacher import save_model_checkpoint
    from megadistill.testing.models import tiny_gpt

    save_model_checkpoint(tiny_gpt(layers=2, hidden=96, heads=4, vocab=512, seq=16, ffn=384), path)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A 2-layer, hidden-96, vocabulary-512 GPT saved as a distributed checkpoint (one rank)."""
    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    run_distributed(_save_tiny_teacher, 1, str(path))
    return path


def _online(checkpoint, **data) -> RunConfig:
    return RunConfig(teacher=TeacherConfig(mode="online", model=TEACHER, checkpoint=str(checkpoint)),
                     data=DataConfig(vocab_size=512, **data))


MISSING = [
    ({"data": {"inputs": ["no/such/file.txt"]}}, r"data.inputs: file no/such/file.txt does not exist"),
    ({"data": {"tokenizer_model": "missing.model"}}, r"data.tokenizer_model: file missing.model does not exist"),
    ({"data": {"data_prefix": "nowhere/corpus", "tokenizer_model": "t.model"}}, r"data.data_prefix: nowhere/corpus.bin does not exist"),
    ({"teacher": {"mode": "online", "checkpoint": "no/such/dir"}}, r"teacher.checkpoint: no/such/dir does not exist"),
    ({"parallel": {"sequence_parallel": True}}, r"parallel.sequence_parallel needs Transformer Engine"),
]


@pytest.mark.parametrize("data, message", MISSING, ids=[m[:40] for _, m in MISSING])
def test_missing_files_pass_the_schema_and_fail_preflight(data, message):
    cfg = config_from_dict(data, world_size=1)  # the pure schema accepts it
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=message):
        preflight(cfg)


def test_data_prefix_needs_its_index_too(tmp_path):
    (tmp_path / "corpus.bin").write_bytes(b"")
    (tmp_path / "t.model").write_bytes(b"")
    cfg = RunConfig(data=DataConfig(data_prefix=str(tmp_path / "corpus"), tokenizer_model=str(tmp_path / "t.model")))
    with pytest.raises(ConfigError, match=r"data.data_prefix: .*corpus.idx does not exist"):
        preflight(cfg)


def test_a_matching_teacher_passes(teacher_checkpoint):
    preflight(_online(teacher_checkpoint))


def test_teacher_with_another_vocabulary_is_rejected(teacher_checkpoint):
    """The run's tokenizer tells the checkpoint's real rows from its padding: 384 ids in its 512 rows
    pass (a TP=2 run pads 384 ids to 512); 600 ids, more than its rows, are refused."""
    preflight(replace(_online(teacher_checkpoint), data=DataConfig(vocab_size=384)))
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint .*: it has 512 vocabulary rows but the tokenizer has 600 "
                                          r"ids: rows 512..599 are missing"):
        preflight(replace(_online(teacher_checkpoint), data=DataConfig(vocab_size=600)))


def test_a_teacher_of_another_tokenizer_is_rejected_by_content(tmp_path, teacher_checkpoint, corpus):
    """The rows check alone would pass a teacher trained with another 512-id tokenizer: the
    tokenizer recorded in its marker must be the run's (by content, so a copy elsewhere passes)."""
    from megadistill.hashing import file_sha256

    ckpt = tmp_path / "step_00000001"  # a checkpoint as runs commit them (the marker is read there)
    shutil.copytree(teacher_checkpoint, ckpt)
    copy = tmp_path / "copy.model"
    shutil.copy(corpus.tokenizer, copy)
    cfg = _online(ckpt, tokenizer_model=str(copy))
    (ckpt / "COMPLETE").write_text(json.dumps({"tokenizer_sha256": file_sha256(corpus.tokenizer)}))
    preflight(cfg)
    (ckpt / "COMPLETE").write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint .* was trained with another tokenizer \(sha256 "
                                          r"000000000000\.\.\.\) than data.tokenizer_model .*copy.model"):
        preflight(cfg)


def test_teacher_architecture_must_match_its_checkpoint(teacher_checkpoint):
    cfg = _online(teacher_checkpoint)
    for key, value, found in (("hidden_size", 64, 96), ("num_layers", 4, 2), ("ffn_hidden_size", 256, 384)):
        bad = replace(cfg, teacher=replace(cfg.teacher, model=replace(TEACHER, **{key: value})))
        with pytest.raises(ConfigError, match=rf"teacher.model.{key} is {value} but teacher.checkpoint .* has {found}"):
            preflight(bad)


def test_a_run_directory_resolves_to_its_latest_complete_checkpoint(tmp_path, teacher_checkpoint):
    run = tmp_path / "run"
    for step, complete in ((3, True), (5, True), (7, False)):
        step_dir = run / "checkpoints" / f"step_{step:08d}"
        shutil.copytree(teacher_checkpoint, step_dir)
        if complete:
            (step_dir / "COMPLETE").write_text("{}")
    assert resolve_teacher_checkpoint(str(run)) == run / "checkpoints" / "step_00000005"
    assert resolve_teacher_checkpoint(str(run / "checkpoints")) == run / "checkpoints" / "step_00000005"
    preflight(_online(run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"teacher.checkpoint: .*empty holds no complete distributed checkpoint"):
        preflight(_online(tmp_path / "empty"))
