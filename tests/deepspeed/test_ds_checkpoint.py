"""DeepSpeed backend checkpoints: save -> load into a freshly built backend (new processes)
continues with the uninterrupted run's losses, grad norms and learning rates bit for bit, dropout
on (RNG restored), at ZeRO-1, 2 and 3 at DP=2; a checkpoint of another ZeRO stage, data-parallel
size or backend is refused with a clear message before DeepSpeed reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ds_testing import build, run_config, train
from torch.multiprocessing import ProcessRaisedException

from megadistill.checkpoint_dir import commit
from megadistill.testing import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo test (forked ranks)")

STEPS, SAVE_AT = 6, 3


def _uninterrupted(cfg, root: str) -> list[dict]:
    """Train STEPS steps, committing a checkpoint after SAVE_AT (as the loop does)."""
    backend, _ = build(cfg)
    out = train(backend, range(SAVE_AT))
    commit(root, SAVE_AT, lambda directory: backend.save(directory, SAVE_AT), {"backend": backend.name})
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


def test_load_refuses_a_directory_without_a_deepspeed_checkpoint(teacher_ckpt, tmp_path):
    cfg = run_config("deepspeed", 1, teacher_ckpt)
    (message,) = run_distributed(_load_error, 1, cfg, str(tmp_path))
    assert "not a checkpoint of the DeepSpeed backend" in message and "optimizer.backend=megatron" in message


def _load_after_training(cfg, directory: str):
    backend, _ = build(cfg)
    train(backend, range(1))
    backend.load(Path(directory))


def test_load_into_a_trained_backend_is_refused(saved):
    cfg, root, _ = saved(3)
    with pytest.raises(ProcessRaisedException, match="freshly built backend"):
        run_distributed(_load_after_training, 2, cfg, str(root / f"step_{SAVE_AT:08d}"))
