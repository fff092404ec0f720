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
from typing import Optional, Protocol, Union

import torch


@dataclass
class SparseLogits:
    """A sparse teacher distribution per token: global vocab ``ids[b, s, k]`` (-1 pads) and their
    τ = 1 ``logprobs[b, s, k]``, identical on every tensor-parallel rank."""

    ids: torch.Tensor
    logprobs: torch.Tensor


Target = Union[torch.Tensor, SparseLogits]


class TeacherSource(Protocol):
    """Supplies KD targets to a backend's forward step."""

    hidden_size: int
    """Width the teacher adds to pipeline stage-to-stage tensors (0: nothing travels with them)."""

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the backend trains: ``student`` itself, or one that also runs the teacher."""
        ...

    def split(self, batch: dict, output) -> tuple[torch.Tensor, Optional[Target]]:
        """``(student_logits[b, s, v/tp], target or None)`` from a micro-batch and the model output
        of the last pipeline stage."""
        ...


class NoTeacher:
    """No teacher: plain next-token training (α is ignored)."""

    hidden_size = 0

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        return student

    def split(self, batch: dict, output):
        return output, None


class OnlineTeacher:
    """A frozen GPT teacher run inside each micro-batch, next to the student on the same ranks.

    ``teacher`` is this rank's stage of the teacher ``GPTModel`` (built with the student's
    vocabulary and TP/PP layout); ``checkpoint`` its weights (a distributed checkpoint directory).
    """

    def __init__(self, teacher: torch.nn.Module, checkpoint: Optional[str] = None, prefix: str = "") -> None:
        self.teacher = teacher
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.hidden_size = teacher.config.hidden_size
        self.model = None
        """The ``DistillationModel`` made by :meth:`wrap`."""

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        from megadistill.megatron.model import DistillationModel

        self.model = DistillationModel(student, self.teacher, self.checkpoint, self.prefix)
        return self.model

    def split(self, batch: dict, output):
        if isinstance(output, tuple):  # the last stage of a DistillationModel
            return output
        return output, None
