"""Configuration of the KD loss and of the teacher-logits processing (the PD paper's design space)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LOSSES = ("forward_kl", "reverse_kl", "jsd", "soft_ce", "mse")
# The PD paper calls soft cross-entropy on teacher probabilities "NLL".
LOSS_ALIASES = {"kl": "forward_kl", "nll": "soft_ce", "rkl": "reverse_kl"}
TRUNCATIONS = ("renormalize", "ghost", "renormalize_both")


@dataclass
class KDLossConfig:
    """What the KD loss computes. Validated on construction; errors name the field."""

    loss: str = "forward_kl"
    """One of forward_kl, reverse_kl, jsd, soft_ce (alias nll), mse (on logits)."""

    temperature: float = 1.0
    """τ > 0 dividing both the student's and the teacher's logits."""

    scale_by_temperature_squared: bool = False
    """Multiply the loss (and so its gradient) by τ², keeping gradient magnitudes comparable across τ."""

    jsd_beta: float = 0.5
    """β in [0, 1] of the generalized JSD: 0 is forward KL, 1 is reverse KL, 0.5 the symmetric JSD."""

    top_p: float = 1.0
    """Keep the smallest set of the teacher's most likely tokens whose mass reaches top_p (1 = off)."""

    top_k: Optional[int] = None
    """Then keep at most top_k of them (None = off). The PD paper's default is top-0.95-100."""

    truncation: str = "renormalize"
    """What happens to the truncated-away mass: renormalize (PD paper), ghost (one residual bucket) or renormalize_both (ModelOpt's top-K: the student too is renormalised on the teacher's kept ids)."""

    chunk_tokens: Optional[int] = None
    """Process this many tokens at a time to bound temporary memory (None = automatic: work buffers
    of 4 M logits on CPU, 32 M on GPU, whatever the vocab shard width)."""

    check_finite: bool = True
    """Raise on NaN/Inf teacher logits. Costs a ``[c]`` check of the loss per chunk; the teacher
    logits are scanned only when that loss is not finite."""

    def __post_init__(self) -> None:
        self.loss = LOSS_ALIASES.get(self.loss, self.loss)
        if self.loss not in LOSSES:
            raise ValueError(f"KDLossConfig.loss: unknown loss {self.loss!r}; choose one of {LOSSES}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"KDLossConfig.temperature must be a finite number, got {self.temperature!r}")
        if self.temperature <= 0:
            raise ValueError(f"KDLossConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"KDLossConfig.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"KDLossConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"KDLossConfig.top_k must be a positive integer or None, got {self.top_k!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(
                f"KDLossConfig.truncation: unknown mode {self.truncation!r}; choose one of {TRUNCATIONS}"
            )
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"KDLossConfig.chunk_tokens must be >= 1 or None, got {self.chunk_tokens}")
        if self.loss == "mse" and self.truncates:
            raise ValueError(
                "KDLossConfig.loss='mse' compares logits and cannot use top_p/top_k truncation; "
                "set top_p=1.0 and top_k=None"
            )
        if self.is_reverse_kl and self.truncates and self.truncation == "renormalize":
            raise ValueError(
                f"KDLossConfig.loss={self.loss!r} (jsd_beta={self.jsd_beta}) is reverse KL, infinite against a renormalised truncated teacher "
                "(zero probability where the student has mass); use truncation='ghost' or no truncation"
            )

    @property
    def is_reverse_kl(self) -> bool:
        """Reverse KL, by name or as JSD with β = 1."""
        return self.loss == "reverse_kl" or (self.loss == "jsd" and self.jsd_beta == 1.0)

    @property
    def truncates(self) -> bool:
        """Whether top-p/top-k truncation is active."""
        return self.top_p < 1.0 or self.top_k is not None
