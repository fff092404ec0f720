"""Per-token divergences between a teacher target and the student, with closed-form gradients.

Every function works on one chunk of ``c`` tokens of this rank's vocab shard, writes into
``out[c, v/tp]`` the gradient with respect to ``z/τ`` *before* the term ``-p·E`` (when it returns
``e_local``: E = Σ_j p_j g_j needs a sum over the whole vocabulary, which the caller all-reduces),
and returns the loss in two parts: ``loss_local[c]`` (this shard's share, summed over ranks by the
caller) and ``loss_ghost[c]`` (the ghost bucket's share, identical on every rank, added once).

The student is compared on the teacher's partition: kept ids one by one, truncated ids as one ghost
category of mass ``P_g``. For any divergence L(P) of the student's category probabilities,
``∂L/∂(z_j/τ) = p_j (g_c(j) - Σ_c P_c g_c)`` with ``g_c = ∂L/∂P_c``; the functions below
specialise that and keep every term finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megadistill.losses.targets import TeacherChunk


@dataclass
class StudentChunk:
    """Student quantities for one chunk: ``log p = (x - m)·scale - log_s`` over the global vocabulary."""

    p: torch.Tensor
    """``[c, v/tp]`` softmax of z/τ."""
    x: torch.Tensor
    """``[c, v/tp]`` raw student logits in the compute dtype. Overwritten by ``p`` when forward KL
    computes its gradient in place: it reads them first, through :func:`forward_kl_cross`."""
    scale: float
    """1/τ."""
    m: torch.Tensor
    """``[c]`` global row max of x."""
    log_s: torch.Tensor
    """``[c]`` log of the global ``Σ exp((x - m)·scale)``."""
    logp_ghost: Optional[torch.Tensor] = None
    """``[c]`` log of the student's total probability on the truncated ids, or None."""
    ghost_w: Optional[torch.Tensor] = None
    """``[c, v/tp]`` the student's distribution *within* the truncated ids (0 on kept ids), for the
    forward-KL ghost gradient; None when not needed."""

    def logp(self) -> torch.Tensor:
        """``[c, v/tp]`` log-probabilities (allocates; needs ``x`` intact)."""
        return torch.sub(self.x, self.m.unsqueeze(-1)).mul_(self.scale).sub_(self.log_s.unsqueeze(-1))


@dataclass
class ChunkResult:
    loss_local: torch.Tensor
    loss_ghost: Optional[torch.Tensor]
    e_local: Optional[torch.Tensor] = None
    e_ghost: Optional[torch.Tensor] = None


def _zero_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with entries zeroed where ``mask``: 0·log 0 = 0 and no gradient through empty buckets."""
    return torch.where(mask, torch.zeros_like(x), x)


def _set_off_kept(out: torch.Tensor, kept: torch.Tensor, p: torch.Tensor, g_ghost: torch.Tensor) -> None:
    """Set the truncated ids' entries of ``out`` to ``p_j · g_ghost`` (``g_ghost[c]``)."""
    out.masked_fill_(~kept, 0.0)
    out.addcmul_(p, torch.where(kept, 0.0, g_ghost.unsqueeze(-1)))


def forward_kl_cross(
    t: TeacherChunk, x: torch.Tensor, scale: float, m: torch.Tensor, scratch: torch.Tensor, soft_ce: bool
) -> torch.Tensor:
    """The part of the forward-KL (or soft-CE) loss that reads the raw student logits ``x[c, v/tp]``
    (global row max ``m[c]``): ``Σ q log q - scale·Σ q (x - m)`` (without ``Σ q log q`` for soft CE).

    Computed before the student softmax may overwrite ``x``; the caller adds ``log_s·Σ q`` once
    the student's normaliser is known. ``scratch[c, v/tp]`` is a work buffer.
    """
    if t.entries is not None:
        # Sparse targets (m_t = log_s_t = 0, x_t = log q on the kept ids): sums over the entries alone.
        e = t.entries
        c = m.shape[0]
        q_x = e.row_sum(e.q * (x.reshape(-1)[e.flat] - m[e.rows]), c) * scale
        return -q_x if soft_ce else e.row_sum(e.q * e.logq, c) * t.scale - q_x
    if not soft_ce and t.scale == scale:
        # scale·(Σ q (x_t - x) - (m_t - m)·Σ q) - log_s_t·Σ q: one pass over q. Large logits
        # cancel inside the element-wise difference and in m_t - m, never between large sums.
        torch.sub(t.x, x, out=scratch).mul_(t.q)
        return (scratch.sum(-1) - (t.m - m) * t.mass_local) * scale - t.log_s * t.mass_local
    torch.sub(x, m.unsqueeze(-1), out=scratch).mul_(t.q)
    q_x = scratch.sum(-1) * scale
    if soft_ce:
        return -q_x
    torch.sub(t.x, t.m.unsqueeze(-1), out=scratch).mul_(t.q)
    return scratch.sum(-1) * t.scale - t.log_s * t.mass_local - q_x


def forward_kl(
    t: TeacherChunk, s: StudentChunk, out: torch.Tensor, cross: torch.Tensor, soft_ce: bool = False,
    target_weight: "float | torch.Tensor" = 1.0,
) -> ChunkResult:
    """KL(q ‖ P) = Σ q (log q - log P), or soft cross-entropy -Σ q log P; both have gradient p - q.

    ``out`` must already hold ``s.p`` (the caller computes the student softmax in place there);
    ``cross`` is :func:`forward_kl_cross` of the same chunk. ``target_weight`` w (a number or per
    token ``[c]``) makes the gradient written ``p - w·q`` instead: the caller's scale on the student
    softmax, or the fused objective's ``α(p - q) + (1-α)p`` at τ = 1, in the same pass.
    """
    loss_local = cross + s.log_s * t.mass_local
    if t.entries is not None:  # sparse: subtract w·q at the kept ids alone
        e = t.entries
        w = target_weight[e.rows] if isinstance(target_weight, torch.Tensor) else target_weight
        out.view(-1).index_add_(0, e.flat, e.q * w, alpha=-1.0)
    elif isinstance(target_weight, torch.Tensor):
        out.addcmul_(t.q, target_weight.unsqueeze(-1), value=-1.0)
    else:
        out.sub_(t.q, alpha=target_weight)
    loss_ghost = None
    if t.kept is not None:
        q_g, lp_g = torch.exp(t.logq_ghost), s.logp_ghost
        term = -q_g * lp_g if soft_ce else q_g * (t.logq_ghost - lp_g)
        loss_ghost = _zero_where(q_g == 0, term)
        if s.ghost_w is not None:
            # Truncated ids share the ghost target q_g in proportion to the student's own mass
            # there: gradient p_j - q_g·w_j, w_j = p_j / P_g computed in log space.
            out.addcmul_(s.ghost_w, (q_g * target_weight).unsqueeze(-1), value=-1.0)
    return ChunkResult(loss_local, loss_ghost)


def reverse_kl(t: TeacherChunk, s: StudentChunk, out: torch.Tensor) -> ChunkResult:
    """KL(P ‖ q) = Σ P (log P - log q); g_c = log P_c - log q_c, and Σ_c P_c g_c is the loss itself."""
    torch.sub(s.logp(), t.logq(), out=out).mul_(s.p)
    if t.kept is not None:
        out.masked_fill_(~t.kept, 0.0)
    loss_local = out.sum(-1)
    loss_ghost = None
    if t.kept is not None:
        a_g = s.logp_ghost - t.logq_ghost
        p_g = torch.exp(s.logp_ghost)
        loss_ghost = _zero_where(p_g == 0, p_g * a_g)
        _set_off_kept(out, t.kept, s.p, _zero_where(p_g == 0, a_g))
    return ChunkResult(loss_local, loss_ghost, e_local=loss_local, e_ghost=loss_ghost)


def jsd(t: TeacherChunk, s: StudentChunk, out: torch.Tensor, beta: float) -> ChunkResult:
    """Generalized JSD of GKD (Agarwal et al. 2024), as TRL computes it:
    β·KL(q ‖ m) + (1-β)·KL(P ‖ m) with the mixture m = β·q + (1-β)·P.

    β = 0 and β = 1 are forward and reverse KL (the caller dispatches those to their own functions,
    as TRL special-cases them; the formula itself tends to 0 there). Because the weights match the
    mixture's, ``∂L/∂P_c = (1-β)(log P_c - log m_c) + const``: the teacher term's gradient cancels
    the student term's ratio ``P/m``.
    """
    lb, l1b = math.log(beta), math.log1p(-beta)
    logp, logq = s.logp(), t.logq()
    logm = torch.logaddexp(logq + lb, logp + l1b)
    tq = t.q * (logq - logm)
    tp = logp.sub_(logm).mul_(s.p)  # P·(log P - log m), in logp's storage
    torch.mul(tp, 1.0 - beta, out=out)
    if t.kept is not None:
        # The ghost category is handled as one coarse category below; drop its ids' fine terms.
        tq.masked_fill_(~t.kept, 0.0)
        tp.masked_fill_(~t.kept, 0.0)
    loss_local = beta * tq.sum(-1) + (1.0 - beta) * tp.sum(-1)
    loss_ghost = None
    if t.kept is not None:
        lq_g, lp_g = t.logq_ghost, s.logp_ghost
        q_g, p_g = torch.exp(lq_g), torch.exp(lp_g)
        logm_g = torch.logaddexp(lq_g + lb, lp_g + l1b)
        loss_ghost = beta * _zero_where(q_g == 0, q_g * (lq_g - logm_g)) + (1.0 - beta) * _zero_where(
            p_g == 0, p_g * (lp_g - logm_g)
        )
        g_g = (1.0 - beta) * (lp_g - logm_g)
        _set_off_kept(out, t.kept, s.p, _zero_where(p_g == 0, g_g))
    return ChunkResult(loss_local, loss_ghost, e_local=out.sum(-1), e_ghost=None)
