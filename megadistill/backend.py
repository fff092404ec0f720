"""The Backend seam: how the student is wrapped, sharded, stepped, evaluated and checkpointed.

The training loop (``megadistill.train``) talks to a :class:`Backend` only. Two implement it:
``megadistill.megatron.backend.MegatronBackend`` (Megatron DDP + distributed optimizer, 1F1B
pipelines) and ``megadistill.deepspeed.backend.DeepSpeedBackend`` (a ZeRO 1/2/3 engine).
``megadistill.assemble.build_backend`` is the one place that chooses between them.

A micro-batch is a dict of ``[b, s]`` tensors ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` and the ``[b]`` global sample ``indices`` it was built from (see
``megadistill.sampler``). The KD target of a micro-batch comes from a ``TeacherSource``
(``megadistill.kd.teacher``), handed to the backend when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from megadistill.kd.knobs import KDStep


@dataclass
class StepResult:
    """What one optimizer step reports."""

    metrics: dict[str, float]
    """Means over the global batch of each reported loss (``lm loss``, ``kd loss``, ``total loss``,
    ``top1 agreement``); filled on the logging rank (last pipeline stage), may be empty elsewhere."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (identical on every rank); None when the backend did
    not compute one."""
    update_successful: bool
    """False when the optimizer skipped the update (fp16 overflow)."""


class Backend(Protocol):
    """A student training engine. Every method is collective over all ranks."""

    def train_step(self, micro_batches: list[dict], knobs: "KDStep") -> StepResult:
        """Forward, backward and one optimizer step over this rank's micro-batches of one global
        batch, with KD weight and temperature ``knobs`` (the loss's step) and the teacher source
        set active per ``knobs.uses_teacher``; then one LR-scheduler step."""
        ...

    def eval_step(self, micro_batches: list[dict]) -> list[dict]:
        """Forward only (α = 0): this rank's per-micro-batch reports (``name -> [sum, count]``
        tensors; on the logging rank, may be empty elsewhere), for ``reduce_reports``."""
        ...

    def learning_rate(self) -> float:
        """The learning rate the next ``train_step`` uses."""
        ...

    def is_logging_rank(self) -> bool:
        """Whether this rank's ``StepResult.metrics`` hold the reduced metrics."""
        ...

    def save(self, directory: Path, step: int) -> None:
        """Write model, optimizer, LR scheduler and every rank's RNG states after ``step`` optimizer
        steps into ``directory`` (an existing, empty temporary directory seen by every rank;
        ``megadistill.checkpoint_dir.commit`` makes it complete atomically afterwards)."""
        ...

    def load(self, directory: Path) -> int:
        """Restore what :meth:`save` wrote; returns its step. Raises a clear error for a checkpoint
        that does not match this run (model shapes, layout)."""
        ...
