"""The per-step distillation knobs (KD weight α, temperature τ): the one route from config to loss."""

from __future__ import annotations

from megadistill.megatron.loss import KDStep


class KnobSchedule:
    """``at(step)`` → the ``KDStep`` of optimizer step ``step`` (0-based): α from ``kd.alpha`` (0
    without a teacher), τ from ``kd.temperature``."""

    def __init__(self, cfg) -> None:
        self.alpha = cfg.kd.alpha
        self.temperature = cfg.kd.temperature
        self.steps = cfg.training.train_steps
        self.has_teacher = cfg.teacher.mode != "none"

    def at(self, step: int) -> KDStep:
        alpha = self.alpha(step, self.steps) if self.has_teacher else 0.0
        return KDStep(alpha=alpha, temperature=self.temperature)
