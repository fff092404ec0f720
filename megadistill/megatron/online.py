"""The online teacher source: a frozen megatron-core GPT run inside each micro-batch, co-located
with the student on the same ranks and pipeline stages (``megadistill.megatron.model.DistillationModel``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable, Optional, Union

import torch

from megadistill.kd.teacher import InModelTargets
from megadistill.megatron.model import DistillationModel
from megadistill.metrics import ModuleTimer


class OnlineTeacher(InModelTargets):
    """A frozen GPT teacher run inside each micro-batch, next to the student on the same ranks.

    ``teacher`` is this rank's stage of the teacher ``GPTModel`` (built with the student's
    vocabulary and TP/PP layout), or a function building it, called by :meth:`wrap` once the
    student exists (so the student's initialisation does not depend on the teacher's);
    ``checkpoint`` holds its weights (a distributed checkpoint directory). ``tokenizer_vocab_size``
    (the run's tokenizer's ids) tells the checkpoint's real vocabulary rows from its padding, so
    that one padded for another TP size loads (``megadistill.megatron.teacher``).
    """

    def __init__(
        self, teacher: Union[torch.nn.Module, Callable[[], torch.nn.Module]], checkpoint: Optional[str] = None,
        prefix: str = "", tokenizer_vocab_size: Optional[int] = None,
    ) -> None:
        self._teacher = teacher
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.model = None
        """The ``DistillationModel`` made by :meth:`wrap`."""
        self._timer = None

    @property
    def teacher(self) -> torch.nn.Module:
        if not isinstance(self._teacher, torch.nn.Module):
            self._teacher = self._teacher()
        return self._teacher

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        self.model = DistillationModel(student, self.teacher, self.checkpoint, self.prefix, self.tokenizer_vocab_size)
        self._timer = ModuleTimer(self.teacher)
        return self.model

    def take_seconds(self) -> Optional[float]:
        return self._timer.take_seconds() if self._timer is not None else None

    def close(self) -> None:
        pass

    def release(self) -> None:
        if self.model is not None:
            self.model.release_teacher()
        self._teacher = self._timer = None
        # Parameters held in reference cycles (hooks, closures) would otherwise wait for the
        # collector; the caching allocator keeps freed CUDA blocks until emptied.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _return_freed_host_memory()

    def prepare(self, micro_batches: list[dict], knobs) -> None:
        pass  # the teacher runs inside each micro-batch's forward

    def set_active(self, active: bool) -> None:
        if active and self.model.teacher is None:
            raise RuntimeError("the teacher was released (KD has ended for this run): it cannot be activated again")
        self.model.teacher_active = active


def _return_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``): CPU tensors of the teacher's
    size often live in the heap rather than in their own mappings, and freeing them alone leaves
    the process's resident size unchanged. A no-op where glibc is absent."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)
