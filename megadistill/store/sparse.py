"""Sparse targets from a teacher's vocab-parallel logits ``[n, v/tp]``: the top-p-k truncation
(kept ids, τ = 1 log-probs, residual mass) and RS-KD draws, decided on the *global* vocabulary
(``megadistill.losses.targets``' truncation threshold, with the kept ids gathered from every vocab
shard) and identical on every tensor-parallel rank. ``precompute-logits`` and the logits recorder
both use them, so a store's bytes do not depend on which wrote it."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megadistill.losses.config import KDLossConfig
from megadistill.losses.parallel import all_gather_last_dim, all_reduce_, group_rank, group_size
from megadistill.losses.softmax import exp_shifted_into, global_max
from megadistill.losses.targets import _truncation_threshold


def _candidate_block(v_local: int, k: int) -> Optional[int]:
    """Ids per block ``B`` for :func:`_kept_positions`, or None when no ``B`` dividing ``v_local``
    leaves at least ``2k`` blocks (then blocks would not narrow the search). Chosen to minimise
    the two top-k searches' widths, ``v_local/B`` and ``(k+1)·B``."""
    sizes = [(v_local // b + (k + 1) * b, b) for b in (2, 4, 8, 16, 32, 64, 128) if v_local % b == 0 and v_local // b >= 2 * k]
    return min(sizes)[1] if sizes else None


def _kept_positions(x: torch.Tensor, lse1: torch.Tensor, cfg: KDLossConfig, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``x[c, v/tp] >= threshold`` for the online loss's truncation threshold
    (``megadistill.losses.targets._truncation_threshold``): ``(rows, cols)``, row-major, so
    ascending column within a row.

    With ``top_k`` set, the threshold only needs each rank's top-k logits, and so do the kept ids
    (barring ties, below). The shard's ids are split into ``nb = v/tp / B ≥ 2k`` blocks of ``B``
    (block ``j`` = ids ``j, j + nb, j + 2·nb, …``: strided, so the block maxima are a reduction
    over contiguous rows); the top-k logits all lie in the ``k + 1`` blocks with the largest
    maxima, since each of those holds a logit at least as large as anything outside them. So the
    threshold is computed from those ``[c, (k+1)·B]`` candidates instead of the vocabulary: the
    same top-k values, hence the same threshold, at a fraction of the cost of a top-k over
    ``v/tp``. A kept id can lie outside the candidates only if the threshold ties the smallest
    chosen block maximum (which bounds every logit outside): such a row (bf16 logits tie often,
    fp32 ones rarely) is compared with the threshold over the whole vocabulary instead. Which rows
    a rank compares in full is its own business: no collective depends on it."""
    c, v_local = x.shape
    k = cfg.top_k
    width = _candidate_block(v_local, k) if k is not None else None
    if width is None:
        return (x >= _truncation_threshold(x, lse1, cfg, group).unsqueeze(-1)).nonzero(as_tuple=True)
    nb = v_local // width
    blocks = x.reshape(c, width, nb)  # blocks[r, t, j] = x[r, t·nb + j]: block j along dim 1
    top = torch.topk(blocks.amax(1), k + 1, dim=-1, sorted=False)
    chosen = top.indices.sort(dim=-1).values  # [c, k+1] block ids, ascending
    cand = blocks.gather(2, chosen.unsqueeze(1).expand(c, width, k + 1)).reshape(c, width * (k + 1))
    threshold = _truncation_threshold(cand, lse1, cfg, group)
    tied = threshold <= top.values.amin(-1)
    keep = cand >= threshold.unsqueeze(-1)
    if bool(tied.any()):
        keep &= ~tied.unsqueeze(-1)
    rows, pos = keep.nonzero(as_tuple=True)
    # Candidate (t, i) is id t·nb + chosen[i]: in row-major candidate order the ids ascend.
    cols = (pos // (k + 1)) * nb + chosen[rows, pos % (k + 1)]
    if not bool(tied.any()):
        return rows, cols
    tied_rows = tied.nonzero().flatten()
    r2, cols2 = (x[tied_rows] >= threshold[tied_rows].unsqueeze(-1)).nonzero(as_tuple=True)
    rows, cols = torch.cat([rows, tied_rows[r2]]), torch.cat([cols, cols2])
    order = torch.argsort(rows * v_local + cols)  # back to row-major
    return rows[order], cols[order]


def select_top_p_k(
    logits: torch.Tensor, cfg: KDLossConfig, group, temperatures: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's kept ids of each token, as the online KD loss keeps them.

    ``logits[c, v/tp]`` is this rank's vocab shard (ids ``[rank·v/tp, (rank+1)·v/tp)``). Returns,
    identical on every rank of ``group``: ``ids[c, k]`` (global ids, by descending log-prob, ties by
    ascending id, -1 pads), their τ = 1 ``logprobs[c, k]`` (float64, -inf pads), the truncated
    mass ``residual[c]`` (float64, summed over the truncated ids themselves) and ``tails[c, T]``
    (float64): ``log Σ_truncated p_i^(1/τ)`` for each τ of ``temperatures`` (``-inf`` where nothing
    is truncated), what a ghost bucket at τ needs beside the kept log-probs (the loss's
    normaliser at τ is ``logsumexp(logprobs/τ) ⊕ tails``). ``k`` is the largest kept count of the
    chunk. Without truncation every id is kept.
    """
    x = logits.float()
    c, v_local = x.shape
    m = global_max(x, group)
    # The threshold is decided exactly as DenseTarget decides it (fp32), so the stored ids are the
    # online loss's; the stored log-probs come from a float64 normaliser.
    lse1 = m + torch.log(all_reduce_(torch.sub(x, m.unsqueeze(-1)).exp_().sum(-1), dist.ReduceOp.SUM, group))
    md = m.double()
    e1d = x.double().sub_(md.unsqueeze(-1)).exp_()
    s1d = all_reduce_(e1d.sum(-1), dist.ReduceOp.SUM, group)
    lse1d = md + torch.log(s1d)
    rank_offset = group_rank(group) * v_local
    if cfg.truncates:
        rows, cols = _kept_positions(x, lse1, cfg, group)
        # Flat indices: 1-D index ops cost half of 2-D advanced indexing here.
        flat = rows * v_local + cols
        e1d.view(-1).index_fill_(0, flat, 0.0)  # what remains is the truncated ids' mass
        residual = all_reduce_(e1d.sum(-1), dist.ReduceOp.SUM, group) / s1d
        del e1d
        # Σ_truncated exp((x - m)/τ), computed as the online loss computes it (the same shifted
        # exponentials, summed over the truncated ids themselves), then shifted to p's units,
        # - (lse1 - m)/τ. In the logits' precision, at least fp32: fp32 is what the store keeps
        # (float64 powers of e1d would cost 5x as much per temperature); float64 logits (tests)
        # give float64 tails.
        xt, mt = (logits, md) if logits.dtype == torch.float64 else (x, m)
        tails = s1d.new_empty((c, len(temperatures)))
        buf = torch.empty_like(xt) if temperatures else None
        for j, t in enumerate(temperatures):
            e = exp_shifted_into(xt, mt, 1.0 / t, buf)
            e.view(-1).index_fill_(0, flat, 0.0)
            tails[:, j] = torch.log(all_reduce_(e.sum(-1), dist.ReduceOp.SUM, group).double()) - (lse1d - md) / t
        del buf
        counts = torch.bincount(rows, minlength=c)  # [c]
        k_local = max(1, int(all_reduce_(counts.max().reshape(1), dist.ReduceOp.MAX, group)))
        # slot = rank of the id among its row's kept ids (rows are sorted, ids ascending in a row).
        slot = torch.arange(rows.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        dst = rows * k_local + slot
        gids = torch.full((c, k_local), -1, dtype=torch.long, device=x.device)
        lp = torch.full((c, k_local), -np.inf, dtype=torch.float64, device=x.device)
        gids.view(-1).index_copy_(0, dst, cols + rank_offset)
        lp.view(-1).index_copy_(0, dst, x.take(flat).double() - lse1d[rows])
    else:
        residual = torch.zeros_like(s1d)
        tails = s1d.new_full((c, len(temperatures)), -np.inf)
        del e1d
        gids = (torch.arange(v_local, device=x.device) + rank_offset).expand(c, v_local)
        lp = x.double() - lse1d.unsqueeze(-1)
    gids, lp = all_gather_last_dim(gids, group), all_gather_last_dim(lp, group)
    # Canonical order, independent of the TP layout: descending log-prob, ties by ascending id.
    # Every rank's valid entries are already in ascending id order and ranks are concatenated in
    # id order, so one stable sort on -log-prob (pads: +inf, last) gives it.
    neg_lp, order = torch.sort(lp.neg_(), dim=-1, stable=True)
    gids = gids.gather(-1, order)
    k = int((gids >= 0).sum(-1).max())
    return gids[:, :k], neg_lp[:, :k].neg_(), residual, tails


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection whose output bits
    all depend on every input bit, so hashing structured keys gives independent-looking streams."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def rskd_uniforms(seed: int, samples, positions, draws: int) -> np.ndarray:
    """``u[c, draws]`` float64 in [0, 1): the uniform of draw ``d`` at ``(samples[c], positions[c])``.

    A counter-based hash of (seed, global sample index, position, draw) rather than a generator
    stream: a draw depends on nothing else (not the batch it is computed in, the rank, the TP layout
    or where a resumed precompute restarted), which is what makes the store byte-reproducible."""
    samples = np.asarray(samples, dtype=np.int64).astype(np.uint64)[:, None]
    positions = np.asarray(positions, dtype=np.int64).astype(np.uint64)[:, None]
    d = np.arange(draws, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h = _mix64(np.full((1, 1), np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15))
        h = _mix64(h ^ samples)
        h = _mix64(h ^ ((positions << np.uint64(20)) | d))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_rskd(logits: torch.Tensor, u: torch.Tensor, group, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RS-KD draws from the teacher's distribution at ``temperature`` τ, ``softmax(z/τ)``, by inverse
    CDF over the *global* vocabulary: the empirical distribution of the draws is then an unbiased
    estimate of the tempered teacher (tempering τ = 1 draws afterwards is not).

    ``logits[c, v/tp]`` is this rank's vocab shard, ``u[c, N]`` the draws' uniforms
    (:func:`rskd_uniforms`). The CDF is laid out rank after rank in id order: every rank learns every
    shard's mass (one all-gather of ``[c]``), the draw's owning rank is chosen from those masses
    (identically on all ranks), and the owner finds the id inside its shard's cumulative sum; a MAX
    all-reduce shares it. Float64 throughout, so a TP=2 layout draws what TP=1 draws unless a
    uniform falls within rounding (~1e-7 of the logits) of a CDF step.

    Returns, identical on every rank: ``ids[c, k]`` the distinct drawn ids (by descending count,
    ties by ascending id; -1 pads) and ``counts[c, k]`` how often each was drawn (0 pads; each row
    sums to N). ``k`` is the chunk's largest number of distinct ids.
    """
    x = logits.double()
    c, v_local = x.shape
    tp, rank = group_size(group), group_rank(group)
    m = global_max(logits.float(), group).double()
    cdf = torch.cumsum(torch.exp((x - m.unsqueeze(-1)) / temperature), dim=-1)  # [c, v/tp]
    masses = all_gather_last_dim(cdf[:, -1:].contiguous(), group)  # [c, tp]
    ends = torch.cumsum(masses, dim=-1)
    starts = ends - masses
    t = u.to(x.device, torch.float64) * ends[:, -1:]  # [c, N]
    owner = torch.searchsorted(ends, t, right=True).clamp_(max=tp - 1)
    local_t = t - starts.gather(-1, owner)
    idx = torch.searchsorted(cdf, local_t, right=True).clamp_(max=v_local - 1)
    ids = torch.where(owner == rank, idx + rank * v_local, torch.full_like(idx, -1))
    ids = all_reduce_(ids, dist.ReduceOp.MAX, group)

    # Distinct ids with their counts, in the canonical order (descending count, ascending id).
    srt = torch.sort(ids, dim=-1).values
    n = srt.shape[-1]
    count = (srt.unsqueeze(-1) == srt.unsqueeze(-2)).sum(-1)  # [c, N] copies of each drawn id
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    vocab = v_local * tp
    key = torch.where(first, (n - count) * (vocab + 1) + srt, torch.full_like(srt, (n + 1) * (vocab + 1)))
    order = torch.argsort(key, dim=-1)
    k = int(first.sum(-1).max())
    order = order[:, :k]
    keep = first.gather(-1, order)
    out_ids = torch.where(keep, srt.gather(-1, order), torch.full_like(order, -1))
    out_counts = torch.where(keep, count.gather(-1, order), torch.zeros_like(order))
    return out_ids, out_counts
