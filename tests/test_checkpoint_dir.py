"""Backend-neutral checkpoint directories and resume decisions: errors reach every rank, and a
resume is refused when the checkpoint cannot vouch for the run it continues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megadistill.checkpoint_dir import COMPLETE_MARKER, checkpoint_path, commit, latest_checkpoint, read_marker
from megadistill.config import ConfigError, OptimizerConfig, RunConfig, TeacherConfig, to_dict
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
        return resume.decide(cfg, Path(root), "0" * 64)
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
    assert run_distributed(_decide, 1, cfg, str(root))[0] == (str(root / "step_00000002"), "/teachers/t1")


def test_a_deepspeed_run_is_not_accepted_as_a_teacher(tmp_path):
    from megadistill.preflight import preflight

    _fake_checkpoint(tmp_path / "ds_run" / "checkpoints", 7, {"backend": "deepspeed"})
    cfg = RunConfig(teacher=TeacherConfig(mode="online", checkpoint=str(tmp_path / "ds_run")))
    with pytest.raises(ConfigError, match=r"teacher.checkpoint .*step_00000007 was written by the deepspeed backend"):
        preflight(cfg)
