"""The factories: what a run's config picks for each seam of the training loop.

- :func:`build_backend`: the student's engine (``megadistill.backend.Backend``): Megatron DDP + the
  distributed optimizer, or a DeepSpeed ZeRO engine;
- :func:`make_teacher_source`: where KD targets come from (``megadistill.kd.teacher.TeacherSource``):
  none, the online teacher (co-located, or its pre-pass), an offline store, or a recorder of the
  run's own logits.

The seams sit low in the package and know no implementation; this module sits above every
implementation and is the one place that chooses among them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megadistill.backend import Backend
from megadistill.config import CHECKPOINT_MODEL_PREFIX, RunConfig
from megadistill.kd.teacher import NoTeacher, TeacherSource
from megadistill.megatron.gpt import build_gpt
from megadistill.megatron.online import OnlineTeacher
from megadistill.megatron.teacher import freeze, load_teacher_checkpoint
from megadistill.store.prepass import PrepassTeacher
from megadistill.store.reader import OfflineTeacher
from megadistill.store.recorder import LogitsRecorder


def build_backend(cfg: RunConfig, vocab_size: int, teacher: TeacherSource) -> Backend:
    """The backend ``cfg.optimizer.backend`` names, with the student built and wrapped."""
    if cfg.optimizer.backend == "deepspeed":
        from megadistill.deepspeed.backend import DeepSpeedBackend  # imports deepspeed: only when chosen

        return DeepSpeedBackend(cfg, vocab_size, teacher)
    from megadistill.megatron.backend import MegatronBackend

    return MegatronBackend(cfg, vocab_size, teacher)


def make_teacher_source(cfg, vocab_size: int, checkpoint: Optional[str], needed: bool = True,
                        tokenizer_vocab_size: Optional[int] = None) -> TeacherSource:
    """The teacher source ``cfg.teacher.mode`` names (the one place that chooses it); none when the
    run no longer ``needed`` one (resumed after SALT's switch to plain LM training). ``vocab_size``
    is the run's padded vocabulary, ``tokenizer_vocab_size`` its tokenizer's ids: an online
    teacher's checkpoint padded for another TP size loads when it is given."""
    if getattr(cfg, "record_logits", None) is not None and cfg.record_logits.store is not None:
        # Plain LM training (teacher.mode none, checked by validate) that records its own logits.
        return LogitsRecorder.for_run(cfg, vocab_size)
    if not needed:
        return NoTeacher()
    if cfg.teacher.mode == "online" and cfg.teacher.placement == "prepass":
        def build(pg_collection=None):
            run = cfg
            if pg_collection is not None:  # the teacher's own layout (teacher.parallel)
                t_tp, t_pp = cfg.teacher.layout(cfg.parallel)
                run = dataclasses.replace(cfg, parallel=dataclasses.replace(
                    cfg.parallel, tensor_model_parallel_size=t_tp, pipeline_model_parallel_size=t_pp,
                    virtual_pipeline_model_parallel_size=None))
            teacher = build_gpt(cfg.teacher.model, run, vocab_size, pg_collection=pg_collection)
            if checkpoint is not None:
                load_teacher_checkpoint(teacher, checkpoint, CHECKPOINT_MODEL_PREFIX, tokenizer_vocab_size,
                                        own_layout=pg_collection is not None)
            return freeze(teacher)

        return PrepassTeacher.for_run(cfg, build)
    if cfg.teacher.mode == "online":
        return OnlineTeacher(lambda: build_gpt(cfg.teacher.model, cfg, vocab_size), checkpoint, CHECKPOINT_MODEL_PREFIX,
                             tokenizer_vocab_size)
    if cfg.teacher.mode == "none":
        return NoTeacher()
    if cfg.teacher.mode == "offline":
        return OfflineTeacher.for_run(cfg, vocab_size)
    raise ValueError(f"teacher.mode {cfg.teacher.mode!r} has no teacher source")
