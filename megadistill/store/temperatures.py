"""The temperatures a logits store is made for.

A top-p-k store keeps the kept ids' τ = 1 log-probs, which serve any τ when the loss renormalises
(``p_i^(1/τ)`` over the kept ids). A ghost bucket at τ needs more: the full tempered teacher's mass
on the truncated ids, ``Σ_truncated p_i^(1/τ)``, which the kept ids do not determine. The store
records it per position for each τ ≠ 1 it is made for (4 bytes each; τ = 1 is the residual it
always holds), so its list of temperatures always contains 1. An RS-KD store's draws are made at
one τ_s (their empirical distribution is an unbiased estimate of the teacher at τ_s only).

:func:`store_temperatures` decides the list from what the user gave (``precompute-logits
--temperatures``, ``record_logits.temperatures``) or, by default, from the τ a run's KD steps take.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from megadistill.config import ConfigError

# Each τ ≠ 1 costs 4 bytes per token and a pass over the vocabulary per precomputed position.
MAX_TEMPERATURES = 16


def store_temperatures(kind: str, given: Optional[Sequence[float]], run_temperatures: Sequence[float],
                       truncation: str, where: str) -> tuple[float, ...]:
    """The sorted temperatures a ``kind`` store is made for.

    ``given`` (None: the default) is what ``where`` (the option or key, for errors) says;
    ``run_temperatures`` the τ the run's KD steps take (``KnobSchedule.kd_temperatures``),
    ``truncation`` its ``kd.truncation``. Top-p-k: ``given`` or the run's, with 1.0 added; a τ
    schedule with more than :data:`MAX_TEMPERATURES` values is an error for a ghost-bucket run (no
    store can serve it exactly) and gives ``(1.0,)`` otherwise (renormalised targets need no tail).
    RS-KD: exactly one temperature (``given`` or the run's). Raises ``ConfigError`` naming ``where``."""
    if given is not None:
        values = list(given)
        for t in values:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ConfigError(f"{where}: temperature {t!r} is not a finite number > 0")
        if not values:
            raise ConfigError(f"{where}: give at least one temperature")
    else:
        values = [float(t) for t in run_temperatures]
    values = sorted({float(t) for t in values})
    if kind == "rskd":
        if given is None and not values:
            return (1.0,)
        if len(values) != 1:
            source = where if given is not None else "the run's KD steps (kd.temperature, kd.temperature_schedule)"
            raise ConfigError(
                f"{where}: RS-KD draws are made at one temperature, {source} take {len(values)} "
                f"({_listed(values)}): make one store per temperature, or use a constant kd.temperature"
            )
        return tuple(values)
    if len(values) > MAX_TEMPERATURES:
        if given is None and truncation != "ghost":
            return (1.0,)
        source = where if given is not None else "the run's τ schedule (kd.temperature_schedule)"
        raise ConfigError(
            f"{where}: {source} gives {len(values)} temperatures ({_listed(values)}); a store holds at most "
            f"{MAX_TEMPERATURES} (4 bytes per token each): use fewer values (a constant kd.temperature), or "
            "truncation renormalize, which serves any temperature"
        )
    return tuple(sorted(set(values) | {1.0}))


def _listed(values: Sequence[float], most: int = 6) -> str:
    shown = ", ".join(f"{t:g}" for t in values[:most])
    return shown + (", ..." if len(values) > most else "")
