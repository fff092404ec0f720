"""The per-step distillation knobs (KD weight α, temperature τ): the one route from config to loss."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megadistill.schedules import kd_ends_at


@dataclasses.dataclass
class KDStep:
    """The per-step knobs a schedule sets before each optimizer step."""

    alpha: float = 0.5
    """KD weight α in ``(1-α)·LM + α·KD``; 0 trains on the LM loss only (the teacher can be skipped)."""

    temperature: Optional[float] = None
    """τ for this step; None uses ``KDLossConfig.temperature`` (a τ schedule sets it per step)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"KD weight alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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
