"""The per-step distillation knobs (KD weight α, temperature τ): the one route from config to loss."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

from megadistill.schedules import kd_ends_at


@dataclasses.dataclass
class KDStep:
    """The per-step knobs a schedule sets before each optimizer step. Both are required: the loss
    takes τ from here alone, and nothing falls back to a default α."""

    alpha: float
    """KD weight α in ``(1-α)·LM + α·KD``; 0 trains on the LM loss only (the teacher does not run)."""

    temperature: float
    """τ > 0 of this step (``KnobSchedule``: ``kd.temperature`` under ``kd.temperature_schedule``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, numbers.Real) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KD weight alpha must be a number in [0, 1], got {self.alpha!r}")
        if not isinstance(self.temperature, numbers.Real) or not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def uses_teacher(self) -> bool:
        """Whether this step needs KD targets (α > 0): the one rule for whether the teacher runs.
        A backend hands it to ``TeacherSource.set_active`` before the step's micro-batches."""
        return self.alpha > 0.0


class KnobSchedule:
    """``at(step)`` → the ``KDStep`` of optimizer step ``step`` (0-based): α from ``kd.alpha`` (0
    without a teacher), τ from ``kd.temperature`` and ``kd.temperature_schedule``."""

    def __init__(self, cfg) -> None:
        self.alpha = cfg.kd.alpha
        self.temperature = cfg.kd.temperature
        self.temperature_schedule = cfg.kd.temperature_schedule
        self.steps = cfg.training.train_steps
        self.has_teacher = cfg.teacher.mode != "none"

    def at(self, step: int) -> KDStep:
        alpha = self.alpha(step, self.steps) if self.has_teacher else 0.0
        return KDStep(alpha=alpha, temperature=self.temperature_schedule(self.temperature, step, self.steps))

    @property
    def teacher_released_at(self) -> Optional[int]:
        """The step from which α is 0 for the rest of the run (SALT's switch to plain LM training):
        the teacher is released before it, and a run resumed at or after it builds none. None when
        the run has no teacher or needs it to the end."""
        return kd_ends_at(self.alpha, self.steps) if self.has_teacher else None

    def needs_teacher(self, start: int) -> bool:
        """Whether a run starting (or resuming) at step ``start`` needs its teacher."""
        end = self.teacher_released_at
        return self.has_teacher and (end is None or start < end)

    def kd_temperatures(self) -> tuple[float, ...]:
        """Every τ a step with KD (α > 0) takes in this run, sorted, each once: what a store's
        tempered targets must serve. One value for a constant τ; a linear or cosine τ schedule
        takes up to one per KD step."""
        if not self.has_teacher:
            return ()
        if self.temperature_schedule.kind == "constant":
            # any() stops at the first KD step (step 0 for every α schedule but a late start).
            return (float(self.temperature),) if any(self.at(s).uses_teacher for s in range(self.steps)) else ()
        return tuple(sorted({k.temperature for k in map(self.at, range(self.steps)) if k.uses_teacher}))
