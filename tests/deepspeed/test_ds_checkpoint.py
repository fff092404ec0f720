"""DeepSpeed backend checkpoints: save -> load into a freshly built backend (new processes)
continues with the uninterrupted run's losses, grad norms and learning rates bit for bit, dropout
on (RNG restored), at ZeRO-1, 2 and 3 at DP=2; a checkpoint of another ZeRO stage, data-parallel
size or backend is refused with a clear message before DeepSpeed reads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ds_testing import build, run_config, train
from torch.multiprocessing import ProcessRaisedException

from megadistill.checkpoint_dir import commit
from megadistill.testing import run_distributed

STEPS, SAVE_AT = 6, 3


def _uninterrupted(cfg, root: str) -> list[dict]:
    """Train STEPS steps, committing a checkpoint after SAVE_AT (as the loop does)."""
    backend, _ = build(cfg)
    out = train(backend, range(SAVE_AT))
    commit(root, SAVE_AT, lambda directory: backend.save(directory, SAVE_AT), {"backend": "deepspeed"})
    return out + train(backend, range(SAVE_AT, STEPS))


def _resumed(cfg, directory: str, restore_rng: bool = True):
    if not restore_rng:  # negative control: everything but the RNG states restored
        import megadistill.rng

        megadistill.rng.set_state = lambda state: None
    backend, _ = build(cfg)
    start = backend.load(Path(directory))
    return start, train(backend, range(start, STEPS))


@pytest.fixture(scope="module")
def saved(teacher_ckpt, tmp_path_factory):
    """stage -> (config, checkpoint root, the uninterrupted run's steps), saved on first use."""
    cache = {}

    def get(stage: int):
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"zero{stage}") / "checkpoints"
            cfg = run_config("deepspeed", stage, teacher_ckpt, dropout=0.1, steps=STEPS)
            cache[stage] = cfg, root, run_distributed(_uninterrupted, 2, cfg, str(root))[0]
        return cache[stage]

    return get


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_reproduces_the_uninterrupted_run_exactly(saved, stage):
    cfg, root, full = saved(stage)
    directory = root / f"step_{SAVE_AT:08d}"
    # Everything DeepSpeed and the backend wrote is inside the committed checkpoint directory.
    assert sorted(p.name for p in root.iterdir()) == [directory.name]
    assert json.loads((directory / "deepspeed.json").read_text())["zero_stage"] == stage
    for start, resumed in run_distributed(_resumed, 2, cfg, str(directory)):
        assert start == SAVE_AT
        assert resumed == full[SAVE_AT:], f"ZeRO-{stage}: resumed {resumed} vs uninterrupted {full[SAVE_AT:]}"
    if stage == 3:
        # Negative control (dropout masks come from the restored RNG): without it, the losses differ.
        _, unseeded = run_distributed(_resumed, 2, cfg, str(directory), restore_rng=False)[0]
        assert unseeded[0]["total loss"] != full[SAVE_AT]["total loss"]


def _load_error(cfg, directory: str) -> str:
    backend, _ = build(cfg)
    try:
        backend.load(Path(directory))
    except ValueError as e:
        return str(e)
    return "loaded"


@pytest.mark.parametrize("saved_stage, stage", [(2, 3), (3, 1)])
def test_load_refuses_another_zero_stage(saved, teacher_ckpt, saved_stage, stage):
    _, root, _ = saved(saved_stage)
    cfg = run_config("deepspeed", stage, teacher_ckpt, dropout=0.1, steps=STEPS)
    for message in run_distributed(_load_error, 2, cfg, str(root / f"step_{SAVE_AT:08d}")):
        assert f"deepspeed.zero_stage {saved_stage} in the checkpoint, {stage} in this run" in message, message


def test_load_refuses_another_data_parallel_size(saved):
    cfg, root, _ = saved(2)
    (message,) = run_distributed(_load_error, 1, cfg, str(root / f"step_{SAVE_AT:08d}"))
    assert "data-parallel size 2 in the checkpoint, 1 in this run" in message, message


def _load_error_of_another_backend(cfg, root: str) -> tuple[str, str]:
    """A committed checkpoint of the Megatron backend, and an uncommitted directory."""
    def write(directory: Path) -> None:
        (directory / "common.pt").write_bytes(b"megatron's")

    other = commit(root, 1, write, {"backend": "megatron"})
    backend, _ = build(cfg)
    uncommitted = "loaded"
    try:
        backend.load(Path(root) / "step_00000002.tmp")
    except FileNotFoundError as e:
        uncommitted = str(e)
    return _load_error(cfg, str(other)), uncommitted


def test_load_refuses_a_directory_without_a_deepspeed_checkpoint(teacher_ckpt, tmp_path):
    cfg = run_config("deepspeed", 1, teacher_ckpt)
    (tmp_path / "step_00000002.tmp").mkdir()
    ((message, uncommitted),) = run_distributed(_load_error_of_another_backend, 1, cfg, str(tmp_path))
    assert "not a checkpoint of the DeepSpeed backend" in message and "optimizer.backend=megatron" in message
    assert "step_00000002.tmp is not a complete megadistill checkpoint" in uncommitted


# Every kind of file a DeepSpeed checkpoint holds (ZeRO-3, DP=2), by a pattern of its path.
DS_FILES = {
    "deepspeed.json": "deepspeed.json",
    "rank state": "rank_state/rank00001.pt",
    "engine model states": "engine/engine/zero_pp_rank_1_mp_rank_00_model_states.pt",
    "engine optimizer partition": "engine/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "engine latest tag": "engine/latest",
}


def _overwrite_64_floats(file: Path) -> None:
    data = bytearray(file.read_bytes())
    start = len(data) // 2
    data[start : start + 256] = bytes(b ^ 0xFF for b in data[start : start + 256])[: len(data) - start]
    file.write_bytes(data)


def test_every_kind_of_corrupted_deepspeed_file_is_detected(saved, tmp_path):
    from megadistill.checkpoint_dir import CorruptCheckpointError, verify

    _, root, _ = saved(3)
    directory = root / f"step_{SAVE_AT:08d}"
    recorded = json.loads((directory / "COMPLETE").read_text())["integrity"]["files"]
    on_disk = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(recorded) == on_disk  # the engine's files and the backend's, all of them
    assert set(DS_FILES.values()) <= set(recorded)
    silent = []
    for i, name in enumerate(DS_FILES.values()):
        for j, corrupt in enumerate((_overwrite_64_floats, lambda f: f.write_bytes(f.read_bytes()[:-1]))):
            copy = tmp_path / f"{i}_{j}" / directory.name
            shutil.copytree(directory, copy)
            corrupt(copy / name)
            try:
                verify(copy)
                silent.append(name)
            except CorruptCheckpointError as e:
                assert name in str(e), str(e)
    assert silent == []


def _load_corrupt(cfg, directory: str) -> str:
    from megadistill.checkpoint_dir import CorruptCheckpointError

    backend, _ = build(cfg)
    try:
        backend.load(Path(directory))
    except CorruptCheckpointError as e:
        return str(e)
    return "loaded"


def test_a_corrupt_deepspeed_checkpoint_is_refused_before_deepspeed_reads_it(saved, tmp_path):
    cfg, root, _ = saved(3)
    copy = tmp_path / f"step_{SAVE_AT:08d}"
    shutil.copytree(root / copy.name, copy)
    _overwrite_64_floats(copy / DS_FILES["engine optimizer partition"])
    for message in run_distributed(_load_corrupt, 2, cfg, str(copy)):
        assert f"checkpoint {copy} is corrupt" in message
        assert f"{DS_FILES['engine optimizer partition']}: content differs from the sha256 recorded at save" in message


def _load_after_training(cfg, directory: str):
    backend, _ = build(cfg)
    train(backend, range(1))
    backend.load(Path(directory))


def test_load_into_a_trained_backend_is_refused(saved):
    cfg, root, _ = saved(3)
    with pytest.raises(ProcessRaisedException, match="freshly built backend"):
        run_distributed(_load_after_training, 2, cfg, str(root / f"step_{SAVE_AT:08d}"))
