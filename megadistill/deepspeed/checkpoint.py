"""Checkpoints of a DeepSpeed engine plus what DeepSpeed does not keep: the LR scheduler and RNG.

Inside the (empty, temporary) directory ``megadistill.checkpoint_dir.commit`` hands over::

    deepspeed.json             rank 0: format, step, ZeRO stage and layout (checked by load)
    rank_state/rank00000.pt    one per global rank: its RNG states and the LR scheduler state
    engine/                    the engine's checkpoint (model, ZeRO optimizer partitions), tag
                               'engine', written by ``engine.save_checkpoint`` (its ``latest``
                               file and ``zero_to_fp32.py`` too)

A ZeRO checkpoint holds one optimizer partition per data-parallel rank and is read back by the
same ranks: :func:`load` refuses a checkpoint of another ZeRO stage, data-parallel size, tensor
or world size before DeepSpeed reads anything. Before that, every file of the committed directory
is checked against the checksums of its ``COMPLETE`` marker (``checkpoint_dir.verify``), and a
read error that still happens names the file. RNG states are restored last, so that the resumed
run draws the dropout masks the uninterrupted run would have.

DeepSpeed's default (torch.save) checkpoint engine writes in the rank's own process: nothing is
forked or spawned. (Its decoupled and DataStates writers, chosen by ``checkpoint.writer`` /
``datastates`` in its config, would write after ``save`` returned, behind the commit's back.)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from megadistill.checkpoint_dir import verify

FORMAT = "megadistill-deepspeed-checkpoint"
VERSION = 1
META_FILE = "deepspeed.json"
ENGINE_DIR = "engine"
ENGINE_TAG = "engine"
RANK_DIR = "rank_state"
# What must match between the saving and the loading run.
LAYOUT_KEYS = ("zero_stage", "data_parallel_size", "tensor_parallel_size", "world_size")


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / RANK_DIR / f"rank{rank:05d}.pt"


def save(directory: Path, step: int, engine, scheduler, layout: dict) -> None:
    """Write ``engine`` (``deepspeed.initialize``'s engine), the ``OptimizerParamScheduler`` and
    this rank's RNG states after ``step`` steps into ``directory``. Collective."""
    from megadistill import rng

    directory = Path(directory)
    rng_state = rng.get_state()  # before anything else could draw
    (directory / RANK_DIR).mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "rng": rng_state, "scheduler": scheduler.state_dict()}, _rank_file(directory, dist.get_rank()))
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, client_state={"megadistill_step": step})
    if dist.get_rank() == 0:
        meta = {"format": FORMAT, "version": VERSION, "step": step, **layout}
        (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    dist.barrier()


def read_meta(directory: Path) -> dict:
    """The checkpoint's ``deepspeed.json``; a clear error for anything else."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ValueError(
            f"{directory} is not a checkpoint of the DeepSpeed backend (no {META_FILE}; was it saved "
            "with optimizer.backend=megatron, or is the save incomplete?)"
        )
    with _reading(path):
        meta = json.loads(path.read_bytes())
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt or not a megadistill checkpoint file (not a JSON object)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def check_layout(directory: Path, meta: dict, layout: dict) -> None:
    """Raise ValueError naming every setting that differs between the checkpoint and this run."""
    names = {
        "zero_stage": "deepspeed.zero_stage",
        "data_parallel_size": "data-parallel size",
        "tensor_parallel_size": "parallel.tensor_model_parallel_size",
        "world_size": "world size",
    }
    diffs = [f"{names[k]} {meta.get(k)} in the checkpoint, {layout[k]} in this run" for k in LAYOUT_KEYS if meta.get(k) != layout[k]]
    if diffs:
        raise ValueError(
            f"cannot resume from {directory}: DeepSpeed ZeRO checkpoints load only into the layout that "
            f"saved them, and {'; '.join(diffs)}"
        )


def load(directory: Path, engine, scheduler, layout: dict) -> int:
    """Restore what :func:`save` wrote into a freshly built engine and scheduler; returns the step.
    Collective."""
    from megadistill import rng

    directory = Path(directory)
    verify(directory)  # before DeepSpeed reads anything; agreed on every rank
    meta = read_meta(directory)
    check_layout(directory, meta, layout)
    rank_file = _rank_file(directory, dist.get_rank())
    with _reading(rank_file):
        state = torch.load(rank_file, weights_only=False)  # our own file, verified above
    if state["step"] != meta["step"]:
        raise ValueError(f"{directory}: rank {dist.get_rank()}'s state is of step {state['step']}, the checkpoint's {meta['step']}")
    with _reading(directory / ENGINE_DIR):
        path, client = engine.load_checkpoint(
            str(directory / ENGINE_DIR),
            tag=ENGINE_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    if path is None or client.get("megadistill_step") != meta["step"]:
        raise ValueError(f"{directory}: DeepSpeed could not load its engine checkpoint from {directory / ENGINE_DIR}")
    # The scheduler replays its saved step count onto the live one; start it from zero.
    scheduler.num_steps = 0
    scheduler.load_state_dict(state["scheduler"])
    rng.set_state(state["rng"])  # last: nothing after it may draw random numbers
    return int(meta["step"])


@contextmanager
def _reading(path: Path):
    """An error while reading ``path`` (a file, or the engine's directory) re-raised naming it."""
    try:
        yield
    except Exception as e:
        if str(path) in str(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"cannot read {path} ({type(e).__name__}: {first}): corrupt, or not a megadistill checkpoint?"
        ) from e
