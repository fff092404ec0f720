"""What a run resumes from: the checkpoint (if any) and the teacher checkpoint, decided on rank 0
and shared, and the settings a resumed run must keep."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megadistill.checkpoint_dir import latest_checkpoint, read_marker
from megadistill.config import ConfigError, RunConfig, resolve_teacher_checkpoint, to_dict

# Settings a resumed run must share with the run it continues: they fix the weights' shapes, the
# data position and content, the schedules and the backend's checkpoint format.
RESUME_INVARIANTS = (
    "model", "teacher.mode", "teacher.model", "parallel.use_distributed_optimizer", "kd",
    "data.inputs", "data.data_prefix", "data.vocab_size", "data.seq_length", "data.global_batch_size",
    "data.split", "training.train_steps", "training.seed", "optimizer", "deepspeed",
)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def resume_mismatches(cfg: RunConfig, saved: Optional[dict]) -> list[str]:
    """Keys whose value differs from the checkpointed run's config (``saved``)."""
    if not saved:
        return []
    now = to_dict(cfg)
    return [k for k in RESUME_INVARIANTS if _lookup(now, k) != _lookup(saved, k)]


def run_marker(cfg: RunConfig, teacher_checkpoint: Optional[str]) -> dict:
    """What every checkpoint of this run records in its completion marker."""
    return {"backend": cfg.optimizer.backend, "config": to_dict(cfg), "teacher_checkpoint": teacher_checkpoint}


def decide(cfg: RunConfig, ckpt_root: Path) -> tuple[Optional[str], Optional[str]]:
    """(checkpoint to resume, teacher checkpoint), chosen on rank 0 and shared, so that ranks which
    list a shared file system at different moments still agree. A resumed run keeps the teacher
    checkpoint it started with, even if a newer one has appeared since."""
    decision: list = [None, None, None]
    if dist.get_rank() == 0:
        try:
            resume = cfg.checkpoint.resume
            path = latest_checkpoint(ckpt_root) if resume == "auto" else (None if resume == "none" else Path(resume))
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"checkpoint.resume: {path} does not exist")
            marker = read_marker(path) if path else {}
            if path and "config" not in marker:
                raise ConfigError(
                    f"cannot resume from {path}: it records no run config to check this run against "
                    "(written outside the training driver, or by an older megadistill); start a new "
                    "output_dir, or set checkpoint.resume=none"
                )
            if path and marker.get("backend", "megatron") != cfg.optimizer.backend:
                raise ConfigError(
                    f"cannot resume from {path}: it was written by the {marker.get('backend')} backend, this run "
                    f"uses optimizer.backend={cfg.optimizer.backend}"
                )
            bad = resume_mismatches(cfg, marker.get("config"))
            if bad:
                raise ConfigError(
                    f"cannot resume from {path}: these settings differ from the checkpointed run's: "
                    f"{', '.join(bad)} (start a new output_dir, or set checkpoint.resume=none)"
                )
            teacher = None
            if cfg.teacher.mode == "online":
                teacher = marker.get("teacher_checkpoint") or str(resolve_teacher_checkpoint(cfg.teacher.checkpoint))
            decision = [str(path) if path else None, teacher, None]
        except Exception as e:  # raised on every rank below, instead of leaving them waiting
            decision = [None, None, e]
    dist.broadcast_object_list(decision, src=0)
    if decision[2] is not None:
        raise decision[2]
    return decision[0], decision[1]
