"""The TeacherSource seam: where the KD target of a micro-batch comes from.

A backend builds its model with ``source.wrap(student)`` and, per micro-batch, splits the model's
output into the student's logits and the KD target with ``source.split(batch, output)``:

* :class:`NoTeacher` — plain LM training; the target is None;
* ``megadistill.megatron.online.OnlineTeacher`` — a frozen megatron-core GPT co-located with the
  student on every stage; the target is its dense logits ``[b, s, v/tp]`` (:class:`InModelTargets`);
* ``megadistill.store.reader.OfflineTeacher`` — sparse targets from an offline logits store, looked
  up by the batch's global sample ``indices``;
* ``megadistill.store.prepass.PrepassTeacher`` — a frozen teacher run forward-only over each step's
  micro-batches before the student (:meth:`TeacherSource.prepare`), its sparse targets held on the
  student's last stage for that step;
* ``megadistill.store.recorder.LogitsRecorder`` — no target: a plain LM run recording its own.

The protocol and the targets live here, at the bottom; ``megadistill.assemble`` picks the source
for a run.

A target is either a dense ``Tensor[b, s, v/tp]`` of teacher logits or :class:`SparseLogits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch


@dataclass
class SparseLogits:
    """A sparse teacher distribution per token: global vocab ``ids[b, s, k]`` (-1 pads) and their
    log-probabilities ``logprobs[b, s, k]``, identical on every tensor-parallel rank.

    Top-p-k targets (``drawn_at`` None) hold the τ = 1 log-probs of the kept ids; the loss tempers
    them to its τ (``p_i^(1/τ)``). With a ghost bucket it also needs the truncated ids' mass at
    that τ: ``residual`` at τ = 1, a column of ``tails`` at any τ in ``temperatures`` (the loss
    refuses a τ it was not given: the tempered tail mass cannot be derived from the kept ids).
    RS-KD targets (``drawn_at`` = τ_s) hold the empirical distribution of draws made at τ_s: an
    unbiased estimate of the teacher at τ_s only, so the loss uses them as they are at τ = τ_s and
    refuses any other τ."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    residual: Optional[torch.Tensor] = None
    """``[b, s]`` the truncated mass ``1 - Σp`` as stored (the ghost bucket at τ = 1), or None:
    derived from ``logprobs`` (exact only when they are)."""
    tails: Optional[torch.Tensor] = None
    """``[b, s, T]`` ``log Σ_{truncated i} p_i^(1/τ_j)`` for ``temperatures[j]`` (``-inf`` where
    nothing was truncated): the ghost bucket's unnormalised log-mass at τ_j, in the units of
    ``logprobs / τ_j``. None: no tempered tails (a ghost bucket only at τ = 1)."""
    temperatures: tuple = ()
    """The τ_j of ``tails``' columns."""
    drawn_at: Optional[float] = None
    """RS-KD: the temperature the draws were made at (``logprobs`` = log(count / N)); None for
    top-p-k targets."""
    checked: bool = False
    """Made in this run by megadistill's own selection (the teacher pre-pass): the loss does not
    validate them again (a check that costs host synchronisations per micro-batch)."""


Target = Union[torch.Tensor, SparseLogits]


class TeacherSource(Protocol):
    """Supplies KD targets to a backend's forward step."""

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the backend trains: ``student`` itself, or one that also runs the teacher."""
        ...

    def set_active(self, active: bool) -> None:
        """Whether the next micro-batches need targets. The backend calls it before each step with
        ``knobs.uses_teacher`` (False for validation), the one place that decides whether the
        teacher runs: False for steps with KD weight α = 0, when an online teacher does not run and
        pipeline tensors keep the student's width."""
        ...

    def prepare(self, micro_batches: list[dict], knobs) -> None:
        """Before the student's schedule for one step (after :meth:`set_active`), with this rank's
        ``micro_batches`` and the step's ``KDStep``: a pre-pass teacher computes the step's targets
        here (collective over the teacher's pipeline and tensor-parallel groups); others do nothing."""
        ...

    def split(self, batch: dict, output) -> tuple[torch.Tensor, Optional[Target]]:
        """``(student_logits[b, s, v/tp], target or None)`` from a micro-batch and the model output
        of the last pipeline stage. With ``kd.fused_output_layer`` the output (and an online
        teacher's target) is a ``megadistill.megatron.fused.FusedOutput`` (hidden states and output
        weight) instead of logits: pass it on as it is (its ``device`` is the hidden states')."""
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

    def prepare(self, micro_batches: list[dict], knobs) -> None:
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
    ``(student_logits, teacher_logits)`` (or the two models' ``FusedOutput``); any other output has
    no target (α must be 0)."""

    def split(self, batch: dict, output):
        if isinstance(output, tuple):
            return output
        return output, None
