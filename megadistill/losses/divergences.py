"""Per-token divergences between a teacher target and the student, with closed-form gradients.

Every function works on one chunk of tokens of this rank's vocab shard and returns:

* ``loss_local[c]``: this shard's part of the per-token loss (summed over ranks by the caller);
* ``loss_ghost[c]``: the ghost bucket's part, identical on every rank (added once);
* ``grad[c, v/tp]``: ∂loss/∂(z/τ) for the local ids, *before* the term ``-p·E`` when ``e_local`` is
  returned (E = Σ_j p_j g_j needs a sum over the whole vocabulary, done by the caller).

The student distribution is compared on the teacher's partition: kept ids one by one, truncated ids
as one ghost category of mass ``P_g``. For every divergence L(P) of the student's category
probabilities, ``∂L/∂(z_j/τ) = p_j (g_c(j) - Σ_c P_c g_c)`` with ``g_c = ∂L/∂P_c``; the functions
below specialise that to keep every term finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megadistill.losses.targets import TeacherChunk


@dataclass
class StudentChunk:
    """Student quantities for one chunk; all ``[c, v/tp]`` unless noted."""

    logp: torch.Tensor
    """log-softmax of z/τ over the global vocabulary."""
    p: torch.Tensor
    """softmax of z/τ over the global vocabulary."""
    logp_ghost: Optional[torch.Tensor]
    """``[c]`` log of the student's total probability on the truncated ids, or None."""


@dataclass
class ChunkResult:
    loss_local: torch.Tensor
    loss_ghost: Optional[torch.Tensor]
    grad: torch.Tensor
    e_local: Optional[torch.Tensor] = None
    e_ghost: Optional[torch.Tensor] = None


def _zero_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with entries zeroed where ``mask``; used for 0·log 0 = 0."""
    return torch.where(mask, torch.zeros_like(x), x)


def _off_kept(grad: torch.Tensor, kept: torch.Tensor, p: torch.Tensor, g_ghost: torch.Tensor) -> torch.Tensor:
    """Replace the truncated ids' entries of ``grad`` with ``p_j · g_ghost`` (``g_ghost[c]``)."""
    return torch.where(kept, grad, p * g_ghost.unsqueeze(-1))


def forward_kl(t: TeacherChunk, s: StudentChunk, soft_ce: bool = False) -> ChunkResult:
    """KL(q ‖ P) = Σ q (log q - log P); soft cross-entropy -Σ q log P has the same gradient p - q."""
    q = torch.exp(t.logq)
    if soft_ce:
        loss_local = -(q * s.logp).sum(-1)
    else:
        d = t.logq - s.logp
        if t.kept is not None:
            d.masked_fill_(~t.kept, 0.0)
        loss_local = torch.linalg.vecdot(q, d)
    grad = s.p - q
    loss_ghost = None
    if t.kept is not None:
        q_g, lp_g = torch.exp(t.logq_ghost), s.logp_ghost
        term = -q_g * lp_g if soft_ce else q_g * (t.logq_ghost - lp_g)
        loss_ghost = _zero_where(q_g == 0, term)
        # Truncated ids share the ghost target q_g in proportion to the student's own mass.
        factor = 1.0 - torch.exp(t.logq_ghost - lp_g)
        factor = torch.where(torch.isfinite(lp_g), factor, torch.ones_like(factor))
        grad = _off_kept(grad, t.kept, s.p, factor)
    return ChunkResult(loss_local, loss_ghost, grad)


def reverse_kl(t: TeacherChunk, s: StudentChunk) -> ChunkResult:
    """KL(P ‖ q) = Σ P (log P - log q); g_c = log P_c - log q_c, and Σ_c P_c g_c is the loss itself."""
    pa = s.p * (s.logp - t.logq)
    if t.kept is not None:
        pa.masked_fill_(~t.kept, 0.0)
    loss_local = pa.sum(-1)
    loss_ghost = None
    if t.kept is not None:
        a_g = s.logp_ghost - t.logq_ghost
        p_g = torch.exp(s.logp_ghost)
        loss_ghost = _zero_where(p_g == 0, p_g * a_g)
        pa = _off_kept(pa, t.kept, s.p, _zero_where(p_g == 0, a_g))
    return ChunkResult(loss_local, loss_ghost, pa, e_local=loss_local, e_ghost=loss_ghost)


def jsd(t: TeacherChunk, s: StudentChunk, beta: float) -> ChunkResult:
    """Generalized JSD: (1-β)·KL(q ‖ m) + β·KL(P ‖ m) with m = β·q + (1-β)·P.

    β = 0 is forward KL and β = 1 reverse KL (both dispatched to their own functions).
    ``g = β (log P - log m) - (1-β) ((1-β) q + β P) / m`` up to a constant.
    """
    if beta == 0.0:
        return forward_kl(t, s)
    if beta == 1.0:
        return reverse_kl(t, s)
    lb, l1b = math.log(beta), math.log1p(-beta)
    q = torch.exp(t.logq)
    logm = torch.logaddexp(t.logq + lb, s.logp + l1b)
    tp = s.p * (s.logp - logm)
    tq = q * (t.logq - logm)
    if t.kept is not None:
        tq.masked_fill_(~t.kept, 0.0)
    pg = beta * tp - (1.0 - beta) * ((1.0 - beta) * q + beta * s.p) * torch.exp(s.logp - logm)
    if t.kept is not None:
        # The ghost category is handled as one coarse category below; drop its ids' fine terms.
        tp.masked_fill_(~t.kept, 0.0)
    loss_local = (1.0 - beta) * tq.sum(-1) + beta * tp.sum(-1)
    loss_ghost = None
    if t.kept is not None:
        lq_g, lp_g = t.logq_ghost, s.logp_ghost
        q_g, p_g = torch.exp(lq_g), torch.exp(lp_g)
        logm_g = torch.logaddexp(lq_g + lb, lp_g + l1b)
        loss_ghost = (1.0 - beta) * _zero_where(q_g == 0, q_g * (lq_g - logm_g)) + beta * _zero_where(
            p_g == 0, p_g * (lp_g - logm_g)
        )
        r_g = ((1.0 - beta) * q_g + beta * p_g) * torch.exp(-logm_g)
        g_g = beta * (lp_g - logm_g) - (1.0 - beta) * r_g
        pg = _off_kept(pg, t.kept, s.p, _zero_where(p_g == 0, g_g))
    return ChunkResult(loss_local, loss_ghost, pg, e_local=pg.sum(-1), e_ghost=None)
