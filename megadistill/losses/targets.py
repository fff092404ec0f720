"""Teacher targets for the vocab-parallel KD loss, materialised one token chunk at a time.

A target yields, per chunk of ``c`` tokens on a rank holding vocab ids ``[start, start + v)``:

* ``logq[c, v]``: the teacher's log-probability of each local id at temperature τ, ``-inf`` where the
  id was truncated away;
* ``kept[c, v]`` (bool) or ``None`` when nothing is truncated;
* ``logq_ghost[c]`` or ``None``: the log-mass of the "ghost" bucket that stands for every truncated id
  (``-inf`` when truncation renormalises, ``renormalize`` or ``renormalize_both``: the teacher is the
  same in both; ``renormalize_both`` renormalises the student too, in the loss). The student is
  compared on the same partition: its ghost mass is the sum of its probabilities over the
  truncated ids.

Truncation (top-p, then top-k) is decided on the teacher's own distribution (τ = 1), as an offline
store would record it; temperature is applied afterwards. Renormalised, the target is the kept ids'
``p_i^(1/τ)`` normalised over the kept ids. With a ghost bucket it is the full tempered teacher
``softmax(z / τ)`` with the truncated ids merged: ``q_i = p_i^(1/τ) / Z`` for kept i and ``q_ghost =
Σ_{truncated} p_j^(1/τ) / Z``, ``Z = Σ_all p_j^(1/τ)`` (exact at any τ: the tail is summed at τ, not
tempered as one category). With every id kept both are exactly ``softmax(z / τ)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megadistill.losses.config import KDLossConfig
from megadistill.losses.softmax import exp_shifted_into, global_max, global_max_argmax, normalize_, softmax_into
from megadistill.losses.parallel import all_gather_last_dim, all_reduce_, group_rank, group_size

NEG_INF = float("-inf")
# Initial candidates per rank when only top-p is set; doubled until the nucleus is covered.
_NUCLEUS_START_K = 64


@dataclass
class TeacherChunk:
    """The teacher distribution for one chunk of ``c`` tokens on this rank's vocab shard.

    On kept ids, ``log q = (x - m)·scale - log_s``; elsewhere q = 0.
    """

    q: torch.Tensor
    """``[c, v/tp]`` probabilities at temperature τ, zero where truncated."""
    x: torch.Tensor
    """``[c, v/tp]`` teacher log-weights (raw logits for dense targets; finite where kept)."""
    scale: float
    """Factor on ``x - m`` (1/τ for dense targets)."""
    m: torch.Tensor
    """``[c]`` offset subtracted from ``x`` (the global row max for dense targets)."""
    log_s: torch.Tensor
    """``[c]`` log-normaliser after the offset."""
    mass_local: torch.Tensor
    """``[c]`` this shard's part of Σ q over kept ids."""
    kept: Optional[torch.Tensor]
    """``[c, v/tp]`` bool mask of kept ids, or None if nothing is truncated."""
    logq_ghost: Optional[torch.Tensor]
    """``[c]`` log-mass of the truncated ids' bucket (``-inf`` when renormalised), or None."""
    top1: Optional[torch.Tensor] = None
    """``[c]`` the teacher's most likely global vocab id (for the top-1 agreement metric), if asked for."""
    entries: Optional["SparseEntries"] = None
    """Sparse targets: the kept ids of this shard as a list (then ``q`` and ``x`` are None unless
    asked for dense), so that the forward-KL terms cost ``O(k)`` per token instead of ``O(v/tp)``."""

    def logq(self) -> torch.Tensor:
        """``[c, v/tp]`` log-probabilities, ``-inf`` where truncated (allocates)."""
        lq = torch.sub(self.x, self.m.unsqueeze(-1)).mul_(self.scale).sub_(self.log_s.unsqueeze(-1))
        return lq if self.kept is None else lq.masked_fill_(~self.kept, NEG_INF)


@dataclass
class SparseEntries:
    """A chunk's kept ids on this shard as ``[c·k]`` entries: ``rows[e]`` (token within the chunk),
    ``flat[e]`` (``row·v/tp + local id``, an index into the flattened ``[c, v/tp]``), ``q[e]`` and
    ``logq[e]`` (the target's probability and its log at τ). Slots holding padding or another
    shard's id are entries with ``q = logq = 0`` at the token's column 0: sums over the entries and
    ``index_add_`` into ``[c, v/tp]`` are unchanged by them."""

    rows: torch.Tensor
    flat: torch.Tensor
    q: torch.Tensor
    logq: torch.Tensor

    def row_sum(self, values: torch.Tensor, c: int) -> torch.Tensor:
        """``[c]`` per-token sums of ``values[e]``."""
        return torch.zeros(c, dtype=values.dtype, device=values.device).index_add_(0, self.rows, values)


def raise_collectively(message: Optional[str], group, device=None) -> None:
    """Raise ``ValueError`` on every rank of ``group`` if any rank has a ``message``.

    Collective: a rank that found nothing wrong raises too, instead of waiting in the next
    all-reduce for a rank that has already left.
    """
    flags = all_gather_last_dim(torch.tensor([0 if message is None else 1], dtype=torch.int32, device=device), group)
    if not bool(flags.any()):
        return
    ranks = flags.nonzero().flatten().tolist()
    raise ValueError(message if message is not None else f"bad KD targets on tensor-parallel rank(s) {ranks}")


def _raise_if_non_finite(x: torch.Tensor, what: str, group, token_offset: int = 0) -> None:
    """Raise on every rank of ``group`` if any rank's ``x[c, v/tp]`` holds NaN/Inf (collective)."""
    bad = ~torch.isfinite(x)
    flags = all_gather_last_dim(bad.any().to(torch.int32).reshape(1), group)
    if not bool(flags.any()):
        return
    ranks = flags.nonzero().flatten().tolist()
    here = ""
    if bool(bad.any()):
        tok, col = bad.nonzero()[0].tolist()
        here = f"; on this rank first at token {tok + token_offset}, vocab id {group_rank(group) * x.shape[-1] + col}"
    raise ValueError(f"{what} contain NaN or Inf on tensor-parallel rank(s) {ranks}{here}")


def _truncation_threshold(z1: torch.Tensor, lse1: torch.Tensor, cfg: KDLossConfig, group) -> torch.Tensor:
    """Smallest kept logit per token ``[c]`` for top-p-then-top-k over the *global* vocabulary.

    Each rank contributes its local top-k candidates (the global top-k are among them); only
    ``[c, k*tp]`` values are gathered, never the vocabulary. With top-p alone, the candidate count
    doubles, for the tokens whose candidates do not yet hold top_p of the mass, until they do. Ids tied with the last kept
    logit are kept as well (bf16 logits tie often), so the kept set never depends on the TP layout.
    """
    v_local = z1.shape[-1]
    vocab = v_local * group_size(group)
    k = cfg.top_k if cfg.top_k is not None else min(_NUCLEUS_START_K, vocab)
    threshold = torch.empty_like(lse1)
    rows = None  # rows still to decide (None = all); identical on every rank, from gathered values
    while True:
        k_eff = min(k, vocab)
        z, lse = (z1, lse1) if rows is None else (z1[rows], lse1[rows])
        local = torch.topk(z, min(k_eff, v_local), dim=-1, sorted=False).values
        cand = torch.topk(all_gather_last_dim(local, group), k_eff, dim=-1, sorted=True).values
        if cfg.top_p >= 1.0:
            n_keep = torch.full_like(lse, k_eff, dtype=torch.long)
            done = torch.ones_like(lse, dtype=torch.bool)
        else:
            probs = torch.exp(cand - lse.unsqueeze(-1))
            before = torch.cumsum(probs, dim=-1) - probs
            # A token is in the nucleus if the mass strictly above it is still short of top_p.
            n_keep = (before < cfg.top_p).sum(-1).clamp_min(1)
            done = (probs.sum(-1) >= cfg.top_p) | (n_keep < k_eff) | (cfg.top_k is not None) | (k_eff >= vocab)
        value = cand.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
        if rows is None:
            threshold = torch.where(done, value, threshold)
            rows = (~done).nonzero().flatten()
        else:
            threshold[rows[done]] = value[done]
            rows = rows[~done]
        if rows.numel() == 0:
            return threshold
        # Only the undecided (flat) rows gather more candidates.
        k = 2 * k_eff


class DenseTarget:
    """Teacher logits ``[s, b, v/tp]`` (vocab-parallel), processed per :class:`KDLossConfig`."""

    def __init__(self, teacher_logits: torch.Tensor, cfg: KDLossConfig, group) -> None:
        self.logits = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        self.cfg = cfg
        self.group = group

    def raw_chunk(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Unprocessed teacher logits ``[c, v/tp]`` of tokens ``a:b`` in ``dtype``."""
        return self.logits[a:b].to(dtype)

    def chunk(
        self, a: int, b: int, dtype: torch.dtype, q_out: Optional[torch.Tensor] = None, top1: bool = False,
        dense: bool = True,
    ) -> TeacherChunk:
        """Teacher distribution of tokens ``a:b``; ``q_out[c, v/tp]`` is an optional buffer for q.
        ``top1`` also finds the teacher's argmax, from the read that finds its row maximum. Dense
        targets are always dense (``dense`` is for :meth:`SparseTarget.chunk`'s signature)."""
        cfg, group = self.cfg, self.group
        x = self.logits[a:b].to(dtype)
        inv_t = 1.0 / cfg.temperature
        q = torch.empty_like(x) if q_out is None else q_out
        m, ids = global_max_argmax(x, group)[:2] if top1 else (global_max(x, group), None)
        if not cfg.truncates:
            sm = softmax_into(x, inv_t, group, q, m=m)
            return TeacherChunk(q, x, inv_t, sm.m, sm.log_s, sm.mass_local, None, None, ids)

        # exp(x - m) once serves the τ = 1 normaliser (for top-p) and, at τ = 1, the target itself.
        e1 = exp_shifted_into(x, m, 1.0, q)
        log_s1 = torch.log(all_reduce_(e1.sum(-1), dist.ReduceOp.SUM, group))
        kept = x >= _truncation_threshold(x, m + log_s1, cfg, group).unsqueeze(-1)
        if inv_t != 1.0:
            exp_shifted_into(x, m, inv_t, q)
        log_tail = None
        if cfg.truncation == "ghost":
            # The tempered teacher's mass on the truncated ids, Σ_truncated exp((x - m)/τ), summed
            # over those ids themselves (not total - kept) so that a small tail keeps its precision.
            log_tail = torch.log(all_reduce_(q.masked_fill(kept, 0.0).sum(-1), dist.ReduceOp.SUM, group))
        sm = normalize_(q, m, group, kept)
        if log_tail is None:
            ghost = torch.full_like(sm.log_s, NEG_INF)
            return TeacherChunk(q, x, inv_t, sm.m, sm.log_s, sm.mass_local, kept, ghost, ids)

        # The full tempered distribution with the truncated ids merged into one bucket: kept ids
        # keep softmax(x/τ)_i, the bucket holds the rest. (Tempering the τ = 1 residual as one
        # category, r^(1/τ), is not this: at τ > 1 it starves a tail spread over many ids.)
        log_z = torch.logaddexp(sm.log_s, log_tail)
        shrink = torch.exp(sm.log_s - log_z)
        q.mul_(shrink.unsqueeze(-1))
        return TeacherChunk(q, x, inv_t, sm.m, log_z, sm.mass_local * shrink, kept, log_tail - log_z, ids)

    def raise_if_corrupt(self, a: int, b: int) -> None:
        """Raise (on every rank) if tokens ``a:b`` of the teacher logits hold NaN or Inf."""
        _raise_if_non_finite(self.logits[a:b], "teacher logits", self.group, token_offset=a)


class SparseTarget:
    """Offline teacher targets: ``ids[s, b, k]`` (global vocab ids, -1 = padding) and their
    τ = 1 log-probabilities ``logprobs[s, b, k]``, replicated on every tensor-parallel rank.

    Each rank scatters only the ids inside its own vocab range; the truncated ids' mass is the
    ghost bucket (``truncation='ghost'``) or dropped by renormalising (then any τ is exact: the
    kept ``p_i^(1/τ)`` renormalised). The ghost bucket at τ is the full tempered teacher's mass on
    the truncated ids, which the kept ids cannot give: at τ = 1 it is ``residual[s, b]`` when given
    (summed over the truncated ids by the teacher), else ``1 - Σ p`` of the given log-probs (exact
    only if they are: fp16 or quantised log-probs shift their rounding error into it); at τ ≠ 1 it
    is the column of ``tails[s, b, T]`` (``log Σ_truncated p_i^(1/τ)``) whose ``temperatures[j]``
    is τ, and a τ without one is an error. ``drawn_at`` (RS-KD) marks ``logprobs`` as an empirical
    distribution of draws made at that τ: used as it is, at that τ only. The ``[c, k]`` arithmetic
    runs in float64: a confident teacher leaves a residual far below fp32's resolution of 1.
    """

    def __init__(
        self,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        cfg: KDLossConfig,
        group,
        v_local: int,
        device: torch.device,
        validate: bool = True,
        residual: Optional[torch.Tensor] = None,
        tails: Optional[torch.Tensor] = None,
        temperatures: tuple = (),
        drawn_at: Optional[float] = None,
    ) -> None:
        if ids.shape != logprobs.shape:
            raise ValueError(f"sparse ids {tuple(ids.shape)} and logprobs {tuple(logprobs.shape)} differ in shape")
        if residual is not None and (residual.shape != ids.shape[:-1] or residual.device != device):
            raise ValueError(f"sparse residual {tuple(residual.shape)} on {residual.device} must be "
                             f"{tuple(ids.shape[:-1])} (the ids' tokens) on {device}")
        if tails is not None and (tails.shape != (*ids.shape[:-1], len(temperatures)) or tails.device != device):
            raise ValueError(f"sparse tails {tuple(tails.shape)} on {tails.device} must be "
                             f"{(*ids.shape[:-1], len(temperatures))} (the ids' tokens x temperatures) on {device}")
        tau = cfg.temperature
        if drawn_at is not None and tau != drawn_at:
            raise ValueError(
                f"sparse targets drawn at temperature {drawn_at:g} (RS-KD) are an unbiased estimate of the teacher at "
                f"that temperature only; the loss's temperature is {tau:g} (draw a store at it)"
            )
        if drawn_at is None and cfg.truncation == "ghost" and tau != 1.0 and (tails is None or tau not in tuple(temperatures)):
            have = ", ".join(f"{t:g}" for t in (1.0, *temperatures)) if tails is not None else "1"
            raise ValueError(
                f"a ghost bucket at temperature {tau:g} needs the teacher's tempered mass on the truncated ids, "
                f"which these sparse targets hold only at temperature(s) {have}; precompute them for {tau:g} "
                "(precompute-logits --temperatures) or use truncation='renormalize'"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"sparse ids must be an integer tensor, got {ids.dtype}")
        if ids.device != device or logprobs.device != device:
            raise ValueError(
                f"sparse ids ({ids.device}) and logprobs ({logprobs.device}) must be on the student "
                f"logits' device ({device})"
            )
        if cfg.loss == "mse":
            raise ValueError("loss='mse' compares logits; sparse (id, log-prob) targets cannot be used with it")
        if cfg.is_reverse_kl and cfg.truncation == "renormalize":
            raise ValueError(
                "loss='reverse_kl' with sparse targets is infinite when renormalised (the student has mass "
                "outside the stored ids); use truncation='ghost'"
            )
        self.ids = ids.reshape(-1, ids.shape[-1]).long()
        self.logprobs = logprobs.detach().reshape(-1, logprobs.shape[-1]).double()
        self.residual = None if residual is None else residual.detach().reshape(-1).double()
        self.log_tail = None  # [n] log Σ_truncated p_i^(1/τ) at the loss's τ ≠ 1 (ghost bucket)
        if drawn_at is None and cfg.truncation == "ghost" and tau != 1.0:
            col = tuple(temperatures).index(tau)
            self.log_tail = tails.detach()[..., col].reshape(-1).double()
        self.drawn_at = drawn_at
        self.cfg = cfg
        self.group = group
        self.v_local = v_local
        self.vocab = v_local * group_size(group)
        self.start = group_rank(group) * v_local
        if validate:
            raise_collectively(self._problem(), group, device)

    def _problem(self) -> Optional[str]:
        """What is wrong with the targets, or None: ids out of range or repeated, log-probs that
        are not log-probabilities, tokens without ids."""
        ids, valid = self.ids, self.ids >= 0
        bad = (ids < -1) | (ids >= self.vocab)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            return (
                f"sparse teacher ids out of range [0, {self.vocab}) (or -1 for padding): "
                f"id {int(ids[tuple(where)])} at token {where[0]}, slot {where[1]}"
            )
        srt = torch.sort(ids, dim=-1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            return f"sparse teacher ids repeat within token {int(dup.nonzero()[0, 0])}; each id may appear once"
        lp = self.logprobs
        if not bool(torch.isfinite(lp[valid]).all()) or bool((lp[valid] > 1e-6).any()):
            return "sparse teacher logprobs must be finite log-probabilities (<= 0)"
        mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)
        if bool((mass > 1.0 + 1e-4).any()):
            tok = int((mass > 1.0 + 1e-4).nonzero()[0, 0])
            return f"sparse teacher probabilities sum to {float(mass[tok]):.6f} > 1 at token {tok}"
        if bool((~valid).all(-1).any()):
            return f"sparse teacher target for token {int((~valid).all(-1).nonzero()[0, 0])} holds no ids (all padding)"
        if self.residual is not None:
            r = self.residual
            # fp16 residuals round to nearest (2^-11 relative), so kept mass + residual may pass 1
            # by that much; more is corruption.
            bad = ~torch.isfinite(r) | (r < 0) | (r > 1) | (mass + r > 1.0 + 1e-3)
            if bool(bad.any()):
                tok = int(bad.nonzero()[0, 0])
                return (f"sparse teacher residual {float(r[tok]):.6g} at token {tok} is not a mass in [0, 1] "
                        f"leaving room for the stored probabilities (sum {float(mass[tok]):.6f})")
        if self.log_tail is not None and bool(torch.isnan(self.log_tail).any() | (self.log_tail == float("inf")).any()):
            tok = int((torch.isnan(self.log_tail) | (self.log_tail == float("inf"))).nonzero()[0, 0])
            return f"sparse teacher tempered tail log-mass {float(self.log_tail[tok])} at token {tok} is not a log-mass"
        return None

    def chunk(
        self, a: int, b: int, dtype: torch.dtype, q_out: Optional[torch.Tensor] = None, top1: bool = False,
        dense: bool = True,
    ) -> TeacherChunk:
        """Teacher distribution of tokens ``a:b``; ``q_out[c, v/tp]`` is an optional buffer for q.
        ``top1``: also the most likely stored id (the first slot among equals). Its kept ids are
        always listed in ``entries``; ``dense=False`` skips the ``[c, v/tp]`` ``q`` and ``x``
        (left None), which only the losses other than forward KL and soft CE read."""
        ids, lp = self.ids[a:b], self.logprobs[a:b]
        valid = ids >= 0
        # RS-KD draws are already at the loss's τ (checked on construction): not tempered again.
        inv_t = 1.0 if self.drawn_at is not None else 1.0 / self.cfg.temperature
        a_ids = (lp * inv_t).masked_fill(~valid, NEG_INF)
        if self.cfg.truncation == "ghost":
            if self.log_tail is not None:
                # τ ≠ 1: log Σ_truncated p_i^(1/τ) as stored, the bucket's exact share of the tempered teacher.
                a_ghost = self.log_tail[a:b]
            elif self.residual is not None:
                a_ghost = torch.log(self.residual[a:b])
            else:
                # τ = 1 (or RS-KD, whose empirical distribution leaves nothing): log r = log(1 - Σ p)
                # = log(-expm1(log Σ p)), exact for a residual near 0.
                log_mass = torch.logsumexp(lp.masked_fill(~valid, NEG_INF), dim=-1).clamp_max(0.0)
                a_ghost = torch.log(-torch.expm1(log_mass))
            # Ids covering the whole vocabulary leave no bucket, whatever rounding left in 1 - Σ p.
            a_ghost = a_ghost.masked_fill(valid.sum(-1) == self.vocab, NEG_INF)
            log_z = torch.logaddexp(torch.logsumexp(a_ids, dim=-1), a_ghost)
        else:
            a_ghost = torch.full(ids.shape[:1], NEG_INF, dtype=lp.dtype, device=lp.device)
            log_z = torch.logsumexp(a_ids, dim=-1)
        logq_ids = (a_ids - log_z.unsqueeze(-1)).to(dtype)

        # This shard's kept ids as a list of entries, one per slot: padding and other shards' ids
        # become entries of value 0 at the token's column 0, which adding leaves unchanged (a fixed
        # count, no host sync to find the local ones).
        c, k = ids.shape
        local = valid & (ids >= self.start) & (ids < self.start + self.v_local)
        rows = torch.arange(c, device=lp.device).repeat_interleave(k)
        flat = (rows * self.v_local + torch.where(local, ids - self.start, 0).reshape(-1))
        local_e = local.reshape(-1)
        logq_e = torch.where(local_e, logq_ids.reshape(-1), 0.0)
        entries = SparseEntries(rows, flat, torch.where(local_e, torch.exp(logq_e), 0.0), logq_e)
        # Ids are distinct within a token (validated), so the counts are 0 or 1.
        kept = torch.zeros((c, self.v_local), dtype=torch.uint8, device=lp.device)
        kept.view(-1).index_add_(0, flat, local_e.to(torch.uint8))
        kept = kept.view(torch.bool)
        q = x = None
        if dense:
            x = torch.zeros((c, self.v_local), dtype=dtype, device=lp.device)
            x.view(-1).index_add_(0, flat, logq_e)
            q = q_out.zero_() if q_out is not None else torch.zeros_like(x)
            q.view(-1).index_add_(0, flat, entries.q)
        zero = torch.zeros(c, dtype=dtype, device=lp.device)
        best = ids.gather(-1, lp.masked_fill(~valid, NEG_INF).argmax(-1, keepdim=True)).squeeze(-1) if top1 else None
        return TeacherChunk(q, x, 1.0, zero, zero, entries.row_sum(entries.q, c), kept, (a_ghost - log_z).to(dtype),
                            best, entries)

    def raise_if_corrupt(self, a: int, b: int) -> None:
        """Sparse targets are validated on construction; nothing more to scan."""
