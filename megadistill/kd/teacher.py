"""The TeacherSource seam: where the KD target of a micro-batch comes from.

A backend builds its model with ``source.wrap(student)`` and, per micro-batch, splits the model's
output into the student's logits and the KD target with ``source.split(batch, output)``:

* :class:`NoTeacher` — plain LM training; the target is None;
* :class:`OnlineTeacher` — a frozen megatron-core GPT co-located with the student on every stage
  (``megadistill.megatron.DistillationModel``); the target is its dense logits ``[b, s, v/tp]``;
* an offline logits store (``megadistill.store``) — sparse targets looked up by the batch's global
  sample ``indices``.

A target is either a dense ``Tensor[b, s, v/tp]`` of teacher logits or :class:`SparseLogits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union

import torch


@dataclass
class SparseLogits:
    """A sparse teacher distribution per token: global vocab ``ids[b, s, k]`` (-1 pads) and their
    τ = 1 ``logprobs[b, s, k]``, identical on every tensor-parallel rank."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    residual: Optional[torch.Tensor] = None
    """``[b, s]`` the truncated mass ``1 - Σp`` as stored (the ghost bucket), or None: derived from
    ``logprobs`` (exact only when they are)."""


Target = Union[torch.Tensor, SparseLogits]


class TeacherSource(Protocol):
    """Supplies KD targets to a backend's forward step."""

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the backend trains: ``student`` itself, or one that also runs the teacher."""
        ...

    def set_active(self, active: bool) -> None:
        """Whether the next micro-batches need targets (False for steps with KD weight α = 0: an
        online teacher then does not run, and pipeline tensors keep the student's width)."""
        ...

    def split(self, batch: dict, output) -> tuple[torch.Tensor, Optional[Target]]:
        """``(student_logits[b, s, v/tp], target or None)`` from a micro-batch and the model output
        of the last pipeline stage."""
        ...

    def take_seconds(self) -> Optional[float]:
        """Seconds this rank spent producing targets since the last call (None: not measured)."""
        ...

    def close(self) -> None:
        """Release what the source holds beyond the run (threads, open files)."""
        ...

    def release(self) -> None:
        """Free the teacher for the rest of the run (KD is over: every later step has α = 0): its
        weights, buffers, reader threads. ``set_active(True)`` is an error afterwards."""
        ...


class NoTeacher:
    """No teacher: plain next-token training (α is ignored)."""

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        return student

    def set_active(self, active: bool) -> None:
        pass

    def take_seconds(self) -> Optional[float]:
        return None

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass

    def split(self, batch: dict, output):
        return output, None


class InModelTargets:
    """Targets that travel in the model output: a ``DistillationModel``'s last pipeline stage returns
    ``(student_logits, teacher_logits)``; any other output has no target (α must be 0)."""

    def split(self, batch: dict, output):
        if isinstance(output, tuple):
            return output
        return output, None


class OnlineTeacher(InModelTargets):
    """A frozen GPT teacher run inside each micro-batch, next to the student on the same ranks.

    ``teacher`` is this rank's stage of the teacher ``GPTModel`` (built with the student's
    vocabulary and TP/PP layout), or a function building it, called by :meth:`wrap` once the
    student exists (so the student's initialisation does not depend on the teacher's);
    ``checkpoint`` holds its weights (a distributed checkpoint directory).
    """

    def __init__(
        self, teacher: Union[torch.nn.Module, Callable[[], torch.nn.Module]], checkpoint: Optional[str] = None,
        prefix: str = "",
    ) -> None:
        self._teacher = teacher
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.model = None
        """The ``DistillationModel`` made by :meth:`wrap`."""
        self._timer = None

    @property
    def teacher(self) -> torch.nn.Module:
        if not isinstance(self._teacher, torch.nn.Module):
            self._teacher = self._teacher()
        return self._teacher

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        from megadistill.megatron.model import DistillationModel
        from megadistill.metrics import ModuleTimer

        self.model = DistillationModel(student, self.teacher, self.checkpoint, self.prefix)
        self._timer = ModuleTimer(self.teacher)
        return self.model

    def take_seconds(self) -> Optional[float]:
        return self._timer.take_seconds() if self._timer is not None else None

    def close(self) -> None:
        pass

    def release(self) -> None:
        import gc

        if self.model is not None:
            self.model.release_teacher()
        self._teacher = self._timer = None
        # Parameters held in reference cycles (hooks, closures) would otherwise wait for the
        # collector; the caching allocator keeps freed CUDA blocks until emptied.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_host_memory()

    def set_active(self, active: bool) -> None:
        if active and self.model.teacher is None:
            raise RuntimeError("the teacher was released (KD has ended for this run): it cannot be activated again")
        self.model.teacher_active = active


def _return_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``): CPU tensors of the teacher's
    size often live in the heap rather than in their own mappings, and freeing them alone leaves
    the process's resident size unchanged. A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def make_teacher_source(cfg, vocab_size: int, checkpoint: Optional[str], needed: bool = True) -> TeacherSource:
    """The teacher source ``cfg.teacher.mode`` names (the one place that chooses it); none when the
    run no longer ``needed`` one (resumed after SALT's switch to plain LM training)."""
    if getattr(cfg, "record_logits", None) is not None and cfg.record_logits.store is not None:
        # Plain LM training (teacher.mode none, checked by validate) that records its own logits.
        from megadistill.store.recorder import LogitsRecorder

        return LogitsRecorder.for_run(cfg, vocab_size)
    if not needed:
        return NoTeacher()
    if cfg.teacher.mode == "online":
        from megadistill.config import CHECKPOINT_MODEL_PREFIX
        from megadistill.megatron.gpt import build_gpt

        return OnlineTeacher(lambda: build_gpt(cfg.teacher.model, cfg, vocab_size), checkpoint, CHECKPOINT_MODEL_PREFIX)
    if cfg.teacher.mode == "none":
        return NoTeacher()
    if cfg.teacher.mode == "offline":
        from megadistill.store.reader import OfflineTeacher

        return OfflineTeacher.for_run(cfg, vocab_size)
    raise ValueError(f"teacher.mode {cfg.teacher.mode!r} has no teacher source")
