"""Backend-neutral checkpoint directories and resume decisions: errors reach every rank, and a
resume is refused when the checkpoint cannot vouch for the run it continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megadistill.checkpoint_dir import COMPLETE_MARKER, checkpoint_path, commit, latest_checkpoint, read_marker
from megadistill.config import CheckpointConfig, ConfigError, OptimizerConfig, RunConfig, TeacherConfig, to_dict
from megadistill.testing import run_distributed


def _commit_with_a_failing_rank(root: str):
    import torch.distributed as dist

    def write(directory: Path) -> None:
        (directory / f"rank{dist.get_rank()}").write_text("shard")
        if dist.get_rank() == 1:
            raise OSError("disk quota exceeded")

    try:
        commit(root, 4, write, {"run": "x"})
    except RuntimeError as e:
        failed = str(e)
    else:
        failed = None
    good = commit(root, 4, lambda d: (d / f"rank{dist.get_rank()}").write_text("shard"), {"run": "x"})
    return failed, str(good)


def test_a_write_failing_on_one_rank_is_raised_on_every_rank(tmp_path):
    results = run_distributed(_commit_with_a_failing_rank, 2, str(tmp_path))
    for failed, good in results:
        # Rank 0 did not hang in a barrier: it learnt of rank 1's error and raised it too.
        assert failed is not None and "rank 1: OSError: disk quota exceeded" in failed
        assert good == str(checkpoint_path(tmp_path, 4))
    assert read_marker(tmp_path / "step_00000004") == {"run": "x", "step": 4}
    assert sorted(p.name for p in (tmp_path / "step_00000004").iterdir()) == [COMPLETE_MARKER, "rank0", "rank1"]


def _fake_checkpoint(root: Path, step: int, marker: dict) -> Path:
    path = checkpoint_path(root, step)
    path.mkdir(parents=True)
    (path / COMPLETE_MARKER).write_text(json.dumps({**marker, "step": step}))
    return path


def _decide(cfg: RunConfig, root: str):
    from megadistill import resume

    try:
        d = resume.decide(cfg, Path(root), "0" * 64, needs_teacher=lambda start: start < 4)
        return d.checkpoint, d.teacher_checkpoint, d.teacher_record, d.start_step
    except ConfigError as e:
        return f"ConfigError: {e}"


def test_resume_is_refused_across_backends_and_without_a_run_record(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 3, {"backend": "deepspeed", "config": to_dict(cfg), "teacher_checkpoint": None})
    msg = run_distributed(_decide, 1, cfg, str(root))[0]
    assert msg.startswith("ConfigError: cannot resume from") and "written by the deepspeed backend" in msg
    ds = RunConfig(output_dir=str(tmp_path), optimizer=OptimizerConfig(backend="deepspeed"))
    msg = run_distributed(_decide, 1, ds, str(root))[0]
    assert "these settings differ from the checkpointed run's: optimizer" in msg  # the backend is a setting too

    _fake_checkpoint(root, 5, {"layout": {"tp": 1}})  # e.g. save_checkpoint() outside the driver
    assert latest_checkpoint(root).name == "step_00000005"
    msg = run_distributed(_decide, 1, cfg, str(root))[0]
    assert "step_00000005: it records no run config to check this run against" in msg


def test_a_resumed_run_keeps_the_teacher_checkpoint_it_recorded(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), teacher=TeacherConfig(mode="online", checkpoint=str(tmp_path / "newer")))
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2, {"backend": "megatron", "config": to_dict(cfg), "teacher_checkpoint": "/teachers/t1"})
    assert run_distributed(_decide, 1, cfg, str(root))[0] == (str(root / "step_00000002"), "/teachers/t1", "/teachers/t1", 2)


def test_a_checkpoint_that_records_its_teacher_by_path_only_resumes_with_a_warning(tmp_path):
    # Written before run markers recorded the teacher's content: the recorded path is kept, unchecked.
    cfg = RunConfig(output_dir=str(tmp_path), teacher=TeacherConfig(mode="online", checkpoint=str(tmp_path / "newer")))
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2, {"backend": "megatron", "config": to_dict(cfg), "teacher_checkpoint": "/teachers/t1"})
    _, result, records = run_distributed(_decide_logged, 1, cfg, str(root))[0]
    assert result == (str(root / "step_00000002"), "/teachers/t1")
    assert f"checkpoint {root / 'step_00000002'} records its teacher by path only" in "\n".join(records)


def test_a_run_resumed_after_its_kd_phase_needs_no_teacher_checkpoint(tmp_path):
    # SALT: from step 4 on the run needs no teacher; the recorded one has been deleted since.
    cfg = RunConfig(output_dir=str(tmp_path), teacher=TeacherConfig(mode="online", checkpoint=str(tmp_path / "gone")))
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 4, {"backend": "megatron", "config": to_dict(cfg), "teacher_checkpoint": "/teachers/t1"})
    assert run_distributed(_decide, 1, cfg, str(root))[0] == (str(root / "step_00000004"), None, "/teachers/t1", 4)
    _fake_checkpoint(root, 3, {"backend": "megatron", "config": to_dict(cfg), "teacher_checkpoint": None})
    (root / "step_00000004" / COMPLETE_MARKER).unlink()  # back before the switch: the teacher is needed
    msg = run_distributed(_decide, 1, cfg, str(root))[0]
    assert msg == f"ConfigError: teacher.checkpoint: {tmp_path / 'gone'} does not exist"


def test_a_deepspeed_run_is_not_accepted_as_a_teacher(tmp_path):
    from megadistill.preflight import preflight

    _fake_checkpoint(tmp_path / "ds_run" / "checkpoints", 7, {"backend": "deepspeed"})
    cfg = RunConfig(teacher=TeacherConfig(mode="online", checkpoint=str(tmp_path / "ds_run")))
    with pytest.raises(ConfigError, match=r"teacher.checkpoint .*step_00000007 was written by the deepspeed backend"):
        preflight(cfg)


# -- Integrity: checksums at commit, verified resume decisions --------------------------------

TOKENIZER_SHA = "0" * 64


def _commit_run(root: str, cfg: RunConfig, steps: list[int]) -> list[str]:
    """Commit fake checkpoints of ``steps`` as the driver would (each rank writes a shard, plus a
    nested file from rank 0), with ``cfg``'s run record."""
    import torch.distributed as dist

    from megadistill import resume

    def write(directory: Path) -> None:
        (directory / f"shard{dist.get_rank()}.bin").write_bytes(bytes(range(256)) * (64 + 64 * dist.get_rank()))
        if dist.get_rank() == 0:
            (directory / "engine").mkdir()
            (directory / "engine" / "state.pt").write_bytes(b"engine state")

    marker = resume.run_marker(cfg, None, TOKENIZER_SHA)
    return [str(commit(root, step, write, marker)) for step in steps]


def test_commit_records_the_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    (path,) = run_distributed(_commit_run, 2, str(tmp_path), RunConfig(output_dir=str(tmp_path)), [3])[0]
    path = Path(path)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    files = marker["integrity"]["files"]
    assert sorted(files) == ["engine/state.pt", "shard0.bin", "shard1.bin"]
    for name, (size, digest) in files.items():
        data = (path / name).read_bytes()
        assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    assert "integrity" not in read_marker(path) and read_marker(path)["step"] == 3


def _decide_logged(cfg: RunConfig, root: str):
    """resume.decide on this rank, with its warnings and error."""
    import logging

    import torch.distributed as dist

    from megadistill import resume

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    for name in ("megadistill.checkpoint_dir", "megadistill.resume"):
        logging.getLogger(name).addHandler(handler)
    try:
        d = resume.decide(cfg, Path(root), TOKENIZER_SHA)
        result = d.checkpoint, d.teacher_checkpoint
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    return dist.get_rank(), result, records


def _corrupt(path: Path, name: str) -> None:
    data = bytearray((path / name).read_bytes())
    data[100:356] = bytes(b ^ 0xFF for b in data[100:356])  # 64 floats' worth, same size
    (path / name).write_bytes(data)


def test_resume_auto_falls_back_past_a_corrupt_latest_checkpoint(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    root = tmp_path / "checkpoints"
    run_distributed(_commit_run, 2, str(root), cfg, [3, 6, 9])
    _corrupt(root / "step_00000009", "shard1.bin")
    (root / "step_00000006" / COMPLETE_MARKER).write_text('{"step": 6, "integ')  # a torn marker
    results = run_distributed(_decide_logged, 2, cfg, str(root))
    for rank, (path, *_), records in results:  # every rank agrees on the fallback
        assert path == str(root / "step_00000003"), (rank, path)
    warnings = "\n".join(results[0][2])
    assert f"checkpoint {root / 'step_00000009'} is corrupt" in warnings
    assert "shard1.bin: content differs from the sha256 recorded at save" in warnings
    assert f"{root / 'step_00000006'} is corrupt" in warnings and "COMPLETE: not valid JSON" in warnings
    assert f"resuming from {root / 'step_00000003'}, the newest intact checkpoint" in warnings
    assert results[1][2] == []  # warned once, by rank 0


def test_resume_from_a_corrupt_checkpoint_path_is_refused_naming_the_file(tmp_path):
    root = tmp_path / "checkpoints"
    cfg = RunConfig(output_dir=str(tmp_path))
    run_distributed(_commit_run, 2, str(root), cfg, [3, 6])
    (root / "step_00000006" / "engine" / "state.pt").unlink()
    explicit = RunConfig(output_dir=str(tmp_path), checkpoint=CheckpointConfig(resume=str(root / "step_00000006")))
    for _, message, _ in run_distributed(_decide_logged, 2, explicit, str(root)):
        assert message.startswith(f"CorruptCheckpointError: checkpoint {root / 'step_00000006'} is corrupt")
        assert "engine/state.pt: missing" in message

    _corrupt(root / "step_00000003", "shard0.bin")  # now none is intact: refused, not restarted
    for _, message, _ in run_distributed(_decide_logged, 2, cfg, str(root)):
        assert message.startswith(f"NoIntactCheckpointError: every complete checkpoint under {root} is corrupt")
        assert "step_00000006/engine/state.pt: missing" in message and "step_00000003/shard0.bin: content differs" in message
        assert "checkpoint.resume: none" in message


def _commit_then_resume_choice(root: str, kill_after_first_rename: bool, new_copy_marked: bool):
    """A checkpoint of step 2, then the state a kill in the middle of re-saving step 2 leaves."""
    import os
    import shutil

    import torch.distributed as dist

    from megadistill.checkpoint_dir import checkpoint_to_resume

    final = commit(root, 2, lambda d: (d / f"weights{dist.get_rank()}").write_text("old copy"), {"run": "x"})
    if kill_after_first_rename and dist.get_rank() == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.copytree(final, tmp)
        if not new_copy_marked:
            (tmp / COMPLETE_MARKER).unlink()  # killed before the new copy's marker was written
        os.replace(final, final.with_name(final.name + ".old"))
    dist.barrier()
    chosen = checkpoint_to_resume(root, "auto")
    return str(chosen), sorted(p.name for p in Path(root).iterdir())


@pytest.mark.parametrize("new_copy_marked", [True, False])
def test_a_re_save_killed_between_its_renames_is_completed_or_undone(tmp_path, new_copy_marked):
    chosen, left = run_distributed(_commit_then_resume_choice, 2, str(tmp_path), True, new_copy_marked)[0]
    # Before: no step_00000002 at all, so the run fell back (or started afresh) silently.
    assert chosen == str(tmp_path / "step_00000002")
    assert left == ["step_00000002"] + ([] if new_copy_marked else ["step_00000002.tmp"])
