"""Checkpoints across megatron-core versions: a checkpoint written by another supported release
either resumes with exactly the losses its writer's uninterrupted run had, or is refused with one
line naming both versions -- never a confusing read error, never a silently different state.

The fixtures in tests/megatron/data (about 290 KB each) were written by
data/make_cross_version_checkpoints.py, once with megatron-core 0.16.1 and once with 0.19.2: the
tiny GPT of checkpoint_training.py (1 layer, hidden 16, dropout 0.1, the distributed optimizer),
saved after step 2, with the loss, grad norm and LR of steps 3-4 of the same run recorded in
cross_version.json. Both runs recorded the same numbers. Here each fixture is resumed under the
installed megatron-core: 0.19 reads both (a 0.16 checkpoint resumes bit for bit), 0.16 reads its
own and refuses 0.19's (no common.pt). Within one version, tests/megatron/test_checkpoint.py
covers every layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoint_training import build_training, tiny_model, train_steps

from megadistill import _compat
from megadistill.checkpoint_dir import COMPLETE_MARKER
from megadistill.megatron import checkpoint as ckpt
from megadistill.megatron.teacher import load_teacher_checkpoint
from megadistill.testing import run_distributed

DATA = Path(__file__).resolve().parent / "data"
RECORD = json.loads((DATA / "cross_version.json").read_text())
MODEL = dict(hidden=16, layers=1, dropout=0.1)  # as make_cross_version_checkpoints.py built it
INSTALLED = _compat.installed_version()


def _readable(writer: str) -> bool:
    return _compat.writes_common_pt(writer) or _compat.reads_checkpoint_without_common_pt(INSTALLED)


def _copy(writer: str, tmp_path: Path) -> Path:
    source = DATA / RECORD[writer]["checkpoint"]
    copy = tmp_path / writer / source.name
    shutil.copytree(source, copy)
    return copy


def _resume(path: str, steps: list[int]):
    ddp, optimizer, scheduler = build_training(**MODEL)
    try:
        ckpt.load_checkpoint(path, ddp, optimizer, scheduler)
    except ValueError as e:
        return type(e).__name__, str(e)
    return [[loss, norm, lr] for loss, norm, lr in train_steps(ddp, optimizer, scheduler, steps)]


def test_the_fixtures_are_the_two_supported_releases():
    assert sorted(RECORD) == ["0.16.1", "0.19.2"]
    assert RECORD["0.16.1"]["after_resume"] == RECORD["0.19.2"]["after_resume"]  # the same run on both
    for writer, entry in RECORD.items():
        marker = json.loads((DATA / entry["checkpoint"] / COMPLETE_MARKER).read_text())
        assert marker["megatron_core"] == writer
        assert (DATA / entry["checkpoint"] / "common.pt").is_file() == _compat.writes_common_pt(writer)


@pytest.mark.parametrize("writer", sorted(RECORD))
def test_a_checkpoint_of_either_release_resumes_bit_for_bit_or_is_refused_naming_both(writer, tmp_path):
    entry = RECORD[writer]
    result = run_distributed(_resume, 1, str(_copy(writer, tmp_path)), entry["steps"])[0]
    if _readable(writer):
        assert result == entry["after_resume"], f"resumed under {INSTALLED} from a {writer} checkpoint"
    else:
        kind, message = result
        assert kind == "IncompatibleCheckpointError", message
        assert f"written by megatron-core {writer}" in message
        assert f"the installed megatron-core {INSTALLED} cannot read that format" in message
        assert "\n" not in message and "cannot read common.pt" not in message


def _teacher_weights(path: str):
    import torch

    model = tiny_model(MODEL["hidden"], MODEL["layers"], dropout=0.0)
    try:
        load_teacher_checkpoint(model, path)
    except ValueError as e:
        return type(e).__name__, str(e)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("writer", sorted(RECORD))
def test_a_teacher_checkpoint_of_either_release_loads_the_same_weights_or_is_refused(writer, tmp_path):
    import torch

    copies = {w: str(_copy(w, tmp_path)) for w in RECORD}
    got = run_distributed(_teacher_weights, 1, copies[writer])[0]
    if _readable(writer):
        reference = run_distributed(_teacher_weights, 1, copies[INSTALLED.split("+")[0]])[0]
        assert torch.equal(got, reference)  # both fixtures hold the same weights
    else:
        assert got[0] == "IncompatibleCheckpointError" and f"megatron-core {writer}" in got[1]


def test_the_refusal_is_decided_by_the_format_under_0_16(monkeypatch, tmp_path):
    """The check itself, with the installed version stood in (it runs the same on both venvs):
    under 0.16, a 0.19 checkpoint is refused naming the recorded writer, or "0.17 or later" where
    its marker records none (written before markers did); its own checkpoints pass; 0.19 passes both."""
    new, old = _copy("0.19.2", tmp_path), _copy("0.16.1", tmp_path)
    monkeypatch.setattr(_compat, "installed_version", lambda: "0.16.1")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"written by megatron-core 0\.19\.2, .* megatron-core 0\.16\.1 cannot"):
        ckpt.check_readable_format(new)
    teacher = new.rename(new.parent / "teacher")  # a teacher directory need not be named step_*
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"written by megatron-core 0\.19\.2"):
        ckpt.check_readable_format(teacher)
    new = teacher
    unrecorded = json.loads((new / COMPLETE_MARKER).read_text())
    unrecorded.pop("megatron_core")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"written by megatron-core 0\.17 or later"):
        ckpt.check_readable_format(new, unrecorded)
    ckpt.check_readable_format(old)
    (old / "common.pt").unlink()  # a 0.16 checkpoint missing its common.pt is not taken for a newer one
    ckpt.check_readable_format(old)
    monkeypatch.setattr(_compat, "installed_version", lambda: "0.19.2")
    ckpt.check_readable_format(new)
    ckpt.check_readable_format(old)


def _resume_with_another_lr(path: str):
    """Build the optimizer with 10x the saved learning rate, then load."""
    import checkpoint_training

    original = checkpoint_training.LR
    checkpoint_training.LR = original * 10
    try:
        ddp, optimizer, scheduler = build_training(**MODEL)
    finally:
        checkpoint_training.LR = original
    try:
        ckpt.load_checkpoint(path, ddp, optimizer, scheduler)
    except ValueError as e:
        return type(e).__name__, str(e)
    return "loaded", ""


def test_a_load_into_an_optimizer_with_another_learning_rate_is_refused_on_every_release(tmp_path):
    """megatron-core 0.16 would load it and keep the saved rates silently; 0.19 fails with a
    KeyError naming neither. megadistill refuses it the same way on both."""
    writer = INSTALLED.split("+")[0]
    kind, message = run_distributed(_resume_with_another_lr, 1, str(_copy(writer, tmp_path)))[0]
    assert kind == "ValueError", message
    assert "was saved by an optimizer with (max_lr, min_lr) (0.003, 0.0003), this optimizer has (0.03, 0.003)" in message
    assert "\n" not in message
