"""Per-step schedules for the KD weight α and the temperature τ (the learning rate uses Megatron's
own ``OptimizerParamScheduler``, WSD included).

α schedules (PD paper, SALT):

* ``constant``: α_max throughout;
* ``linear``: α_start → α_max over the run (``linear`` up or down);
* ``cosine``: α_max → α_min along a half cosine;
* ``periodic``: α_min ↔ α_max as a cosine wave of ``period`` steps;
* ``wsd``: warmup 0 → α_max, stable, then decay → α_min over the last ``decay_fraction`` (PD*);
* ``salt``: α_max for the first ``n_kd`` steps, then 0 (abruptly, or linearly over
  ``transition_steps``): SALT's two phases.

τ schedules: ``constant`` (``kd.temperature`` throughout), ``linear`` and ``cosine`` (from
``kd.temperature`` at step 0 to ``final`` at the last step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA_SCHEDULES = ("constant", "linear", "cosine", "periodic", "wsd", "salt")
TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class AlphaSchedule:
    """The KD weight α in ``(1-α)·L_lm + α·L_kd`` as a function of the step."""

    kind: str = "constant"
    """One of constant, linear, cosine, periodic, wsd, salt."""

    alpha_max: float = 0.5
    """The largest α (constant value; stable value of wsd; phase-1 value of salt)."""

    alpha_min: float = 0.0
    """The smallest α (end of cosine/wsd decay; trough of periodic)."""

    alpha_start: float = 0.0
    """α at step 0 for ``linear``."""

    warmup_fraction: float = 0.1
    """wsd: fraction of the run spent warming α up from 0."""

    decay_fraction: float = 0.2
    """wsd: fraction of the run (at the end) spent decaying α to alpha_min."""

    period: int = 100
    """periodic: steps per cycle."""

    n_kd: int = 0
    """salt: number of KD steps (phase 1) before plain LM training."""

    transition_steps: int = 0
    """salt: steps over which α falls linearly to 0 after n_kd (0 = abrupt switch)."""

    def validate(self, prefix: str = "kd.alpha") -> None:
        if self.kind not in ALPHA_SCHEDULES:
            raise ValueError(f"{prefix}.kind: unknown schedule {self.kind!r}; choose one of {ALPHA_SCHEDULES}")
        for name in ("alpha_max", "alpha_min", "alpha_start"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{prefix}.{name} must be in [0, 1], got {v}")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"{prefix}.alpha_min ({self.alpha_min}) exceeds alpha_max ({self.alpha_max})")
        for name in ("warmup_fraction", "decay_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{prefix}.{name} must be in [0, 1], got {v}")
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError(f"{prefix}.warmup_fraction + decay_fraction must be <= 1")
        if self.period < 1:
            raise ValueError(f"{prefix}.period must be >= 1, got {self.period}")
        if self.n_kd < 0 or self.transition_steps < 0:
            raise ValueError(f"{prefix}.n_kd and transition_steps must be >= 0")

    def __call__(self, step: int, total_steps: int) -> float:
        """α at ``step`` (0-based) of a ``total_steps`` run."""
        frac = step / max(total_steps - 1, 1)
        if self.kind == "constant":
            return self.alpha_max
        if self.kind == "linear":
            return self.alpha_start + (self.alpha_max - self.alpha_start) * frac
        if self.kind == "cosine":
            return self.alpha_min + (self.alpha_max - self.alpha_min) * 0.5 * (1 + math.cos(math.pi * frac))
        if self.kind == "periodic":
            phase = (step % self.period) / self.period
            return self.alpha_min + (self.alpha_max - self.alpha_min) * 0.5 * (1 - math.cos(2 * math.pi * phase))
        if self.kind == "wsd":
            # Whole steps: warmup steps 0..warm-1 climb to α_max, the last `decay` steps fall to α_min.
            warm = math.ceil(self.warmup_fraction * total_steps)
            decay = math.ceil(self.decay_fraction * total_steps)
            if step < warm:
                return self.alpha_max * (step + 1) / warm
            if decay == 0 or step < total_steps - decay:
                return self.alpha_max
            t = (step - (total_steps - decay) + 1) / decay
            return self.alpha_max + (self.alpha_min - self.alpha_max) * min(t, 1.0)
        # salt
        if step < self.n_kd:
            return self.alpha_max
        if self.transition_steps and step < self.n_kd + self.transition_steps:
            return self.alpha_max * (1 - (step - self.n_kd + 1) / (self.transition_steps + 1))
        return 0.0


def kd_ends_at(alpha: AlphaSchedule, total_steps: int) -> int | None:
    """The first step from which α stays 0 to the end of a ``total_steps`` run (a teacher is not
    needed from there on), or None if α is positive at the last step."""
    if alpha.kind == "salt":
        end = alpha.n_kd + alpha.transition_steps if alpha.alpha_max > 0 else 0
        return end if end < total_steps else None
    step = total_steps
    while step > 0 and alpha(step - 1, total_steps) == 0.0:
        step -= 1
    return step if step < total_steps else None


@dataclass
class TemperatureSchedule:
    """The KD temperature τ per step: kd.temperature at step 0, then linear or cosine to final."""

    kind: str = "constant"
    """One of constant (kd.temperature throughout), linear, cosine."""

    final: float | None = None
    """τ at the last step for linear and cosine (required for them; unused by constant)."""

    def validate(self, prefix: str = "kd.temperature_schedule") -> None:
        if self.kind not in TEMPERATURE_SCHEDULES:
            raise ValueError(f"{prefix}.kind: unknown schedule {self.kind!r}; choose one of {TEMPERATURE_SCHEDULES}")
        if self.kind == "constant":
            if self.final is not None:
                raise ValueError(f"{prefix}.final is set but kind is constant: set kind linear or cosine, or unset final")
            return
        if self.final is None:
            raise ValueError(f"{prefix}.final is required for kind {self.kind} (τ at the last step)")
        if isinstance(self.final, bool) or not isinstance(self.final, (int, float)) or not math.isfinite(self.final) \
                or self.final <= 0:
            raise ValueError(f"{prefix}.final must be a positive finite number, got {self.final!r}")

    def __call__(self, start: float, step: int, total_steps: int) -> float:
        """τ at ``step`` (0-based) of a ``total_steps`` run starting from ``start``."""
        if self.kind == "constant":
            return start
        frac = step / max(total_steps - 1, 1)
        if self.kind == "linear":
            return start + (self.final - start) * frac
        return self.final + (start - self.final) * 0.5 * (1 + math.cos(math.pi * frac))
