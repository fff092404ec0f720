"""Single-process, full-vocabulary float64 reference for the KD losses, in plain torch ops.

Written independently of ``megadistill.losses``: per token, it builds the teacher's and the
student's category distributions explicitly (kept ids one by one, plus the ghost bucket) and lets
autograd differentiate the textbook formulas. The teacher at temperature τ is the full tempered
softmax(z/τ) (truncation decided on softmax(z), τ = 1): renormalised over the kept ids, or with the
truncated ids' tempered mass merged into the ghost bucket.
"""

from __future__ import annotations

import torch

from megadistill.losses import KDLossConfig


# The KD loss settings the loss tests sweep: every divergence (JSD at both ends of β and between),
# MSE on logits, and the truncations a dense and a sparse teacher can take.
DIVERGENCES = [
    dict(loss="forward_kl"),
    dict(loss="soft_ce"),
    dict(loss="reverse_kl"),
    dict(loss="jsd", jsd_beta=0.3),
    dict(loss="jsd", jsd_beta=0.0),
    dict(loss="jsd", jsd_beta=1.0),
]
LOSSES = DIVERGENCES + [dict(loss="mse")]
DENSE_TRUNCATIONS = [
    dict(),
    dict(top_p=0.8, top_k=5, truncation="renormalize"),
    dict(top_p=0.8, top_k=5, truncation="ghost"),
    dict(top_p=0.8, top_k=5, truncation="renormalize_both"),
]
SPARSE_TRUNCATIONS = [dict(truncation="renormalize"), dict(truncation="ghost"), dict(truncation="renormalize_both")]


def kept_mask(teacher_logits: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    """``[n, V]`` bool: top-p (smallest prefix reaching mass top_p), then top-k, of softmax(z)."""
    probs = torch.sort(torch.softmax(teacher_logits, -1), dim=-1, descending=True).values
    before = torch.cumsum(probs, -1) - probs
    keep_sorted = before < cfg.top_p
    keep_sorted[:, 0] = True
    if cfg.top_k is not None:
        keep_sorted[:, cfg.top_k:] = False
    # Ids tied with the last kept one are kept too (bf16 logits tie often; the cut stays TP-invariant).
    last = keep_sorted.sum(-1, keepdim=True) - 1
    threshold = torch.sort(teacher_logits, dim=-1, descending=True).values.gather(-1, last)
    return teacher_logits >= threshold


def truncated_tempered_mass(teacher_logits: torch.Tensor, kept: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[n]`` Σ over the truncated ids (``~kept[n, V]``) of ``p_j^(1/τ)``, p = softmax(z) of the full
    ``teacher_logits[n, V]``: the ghost bucket's weight at τ, before normalising with the kept ids'."""
    w = torch.exp(torch.log_softmax(teacher_logits.double(), -1) / temperature)
    return torch.where(kept, torch.zeros_like(w), w).sum(-1)


def teacher_categories(p1: torch.Tensor, kept: torch.Tensor, cfg: KDLossConfig, tail=None, drawn: bool = False):
    """From τ=1 probabilities ``p1[n, V]`` (zero where not stored) → tempered ``q[n, V]``, ``q_ghost[n]``.

    Kept ids weigh ``p_i^(1/τ)``. Renormalised, that is all. With a ghost bucket the bucket weighs
    ``tail[n]`` = Σ_truncated p_j^(1/τ) (what the full teacher puts on the truncated ids at τ); None
    is the τ = 1 residual ``1 - Σ_kept p`` and only valid at τ = 1. ``drawn``: ``p1`` is an RS-KD
    empirical distribution already at the loss's τ, used as it is.
    """
    inv_t = 1.0 if drawn else 1.0 / cfg.temperature
    w = torch.where(kept, p1**inv_t, torch.zeros_like(p1))
    if cfg.truncation == "ghost":
        if tail is None:
            if inv_t != 1.0:
                raise ValueError(f"reference: a ghost bucket at temperature {cfg.temperature:g} needs the tempered tail")
            tail = (1.0 - (p1 * kept).sum(-1)).clamp_min(0.0)
        w_g = tail.to(p1.dtype)
    else:
        w_g = torch.zeros(p1.shape[0], dtype=p1.dtype)
    z = w.sum(-1) + w_g
    return w / z[:, None], w_g / z


def _row_loss(P: torch.Tensor, Q: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    xl = torch.xlogy
    if cfg.loss == "forward_kl":
        return (xl(Q, Q) - xl(Q, P)).sum()
    if cfg.loss == "soft_ce":
        return -xl(Q, P).sum()
    if cfg.loss == "reverse_kl":
        return (xl(P, P) - xl(P, Q)).sum()
    b = cfg.jsd_beta
    if b == 0.0:
        return (xl(Q, Q) - xl(Q, P)).sum()
    if b == 1.0:
        return (xl(P, P) - xl(P, Q)).sum()
    M = b * Q + (1 - b) * P  # GKD's generalized JSD, as TRL
    return (b * (xl(Q, Q) - xl(Q, M)) + (1 - b) * (xl(P, P) - xl(P, M))).sum()


def reference_loss(student: torch.Tensor, q: torch.Tensor, q_ghost, kept, cfg: KDLossConfig) -> torch.Tensor:
    """Per-token loss ``[n]`` for full-vocab ``student[n, V]`` (requires_grad) against a teacher
    target ``q[n, V]`` with optional ``kept[n, V]`` and ``q_ghost[n]``."""
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    p = torch.softmax(student / cfg.temperature, -1)
    out = []
    for i in range(student.shape[0]):
        if kept is None:
            P, Q = p[i], q[i]
        else:
            k = kept[i]
            P, Q = p[i][k], q[i][k]
            if not bool(k.all()):
                P = torch.cat([P, p[i][~k].sum().reshape(1)])
                Q = torch.cat([Q, q_ghost[i].reshape(1)])
        out.append(_row_loss(P, Q, cfg))
    return torch.stack(out) * scale


def reference_dense(student: torch.Tensor, teacher: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    """Per-token loss ``[n]`` of full-vocab ``student[n, V]`` against teacher logits ``[n, V]``.

    Truncation is decided on softmax(z) (τ = 1); the target is then the full tempered teacher
    softmax(z/τ): renormalised over the kept ids, or with the truncated ids' mass merged into the
    ghost bucket."""
    if cfg.loss == "mse":
        scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
        return (((student - teacher) / cfg.temperature) ** 2).mean(-1) * scale
    q_full = torch.softmax(teacher / cfg.temperature, -1)
    if not cfg.truncates:
        return reference_loss(student, q_full, None, None, cfg)
    kept = kept_mask(teacher, cfg)
    q = torch.where(kept, q_full, torch.zeros_like(q_full))
    if cfg.truncation == "ghost":
        q_g = (q_full - q).sum(-1)
    else:
        q, q_g = q / q.sum(-1, keepdim=True), torch.zeros(q.shape[0], dtype=q.dtype)
    return reference_loss(student, q, q_g, kept, cfg)


def reference_sparse(
    student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, cfg: KDLossConfig, tail=None, drawn: bool = False
):
    """Per-token loss ``[n]`` against sparse ``ids[n, k]`` (-1 pads) with τ=1 ``logprobs[n, k]``.

    ``tail[n]``: Σ_truncated p_j^(1/τ) at the loss's τ (a ghost bucket at τ ≠ 1 needs it; see
    :func:`truncated_tempered_mass`). ``drawn``: RS-KD targets, not tempered."""
    n, vocab = student.shape
    valid = ids >= 0
    p1 = torch.zeros(n, vocab, dtype=student.dtype)
    kept = torch.zeros(n, vocab, dtype=torch.bool)
    for i in range(n):
        p1[i, ids[i][valid[i]]] = logprobs[i][valid[i]].exp().to(student.dtype)
        kept[i, ids[i][valid[i]]] = True
    q, q_g = teacher_categories(p1, kept, cfg, tail, drawn)
    return reference_loss(student, q, q_g, kept, cfg)


def random_sparse_teacher(seed: int, s: int, b: int, k: int, vocab: int):
    """``(ids[s, b, k], logprobs[s, b, k], teacher[s, b, V])``: the top-k ids of a random float64
    teacher ``teacher`` with their log-probs, shuffled, about a fifth of the slots padded (id -1,
    log-prob 0; never the first)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(s * b, vocab, generator=g, dtype=torch.float64) * 3.0
    top = torch.topk(torch.log_softmax(teacher, -1), k, dim=-1)
    perm = torch.argsort(torch.rand(s * b, k, generator=g), dim=-1)
    ids, lp = top.indices.gather(-1, perm), top.values.gather(-1, perm)
    pad = torch.rand(s * b, k, generator=g) < 0.2
    pad[:, 0] = False
    ids = torch.where(pad, torch.full_like(ids, -1), ids)
    lp = torch.where(pad, torch.zeros_like(lp), lp)
    return ids.reshape(s, b, k), lp.reshape(s, b, k), teacher.reshape(s, b, vocab)


def random_sparse_targets(seed: int, s: int, b: int, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of :func:`random_sparse_teacher`."""
    return random_sparse_teacher(seed, s, b, k, vocab)[:2]


def stored_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[..., V]`` bool: the ids of ``ids[..., k]`` (-1 pads ignored)."""
    valid = ids >= 0
    hot = torch.zeros(*ids.shape[:-1], vocab + 1, dtype=torch.bool)
    hot.scatter_(-1, torch.where(valid, ids, torch.full_like(ids, vocab)), True)
    return hot[..., :vocab]


def sparse_tails(teacher: torch.Tensor, ids: torch.Tensor, temperatures) -> torch.Tensor:
    """``tails[..., T]`` float64: log Σ_{j not in ids} p_j^(1/τ) for each τ of ``temperatures``, from the
    full ``teacher[..., V]`` logits (what a store holds beside the kept ids; -inf if none is left)."""
    kept = stored_mask(ids, teacher.shape[-1])
    flat_t, flat_k = teacher.reshape(-1, teacher.shape[-1]), kept.reshape(-1, teacher.shape[-1])
    cols = [torch.log(truncated_tempered_mass(flat_t, flat_k, t)) for t in temperatures]
    if not cols:
        return torch.zeros(*ids.shape[:-1], 0, dtype=torch.float64)
    return torch.stack(cols, -1).reshape(*ids.shape[:-1], len(cols))


def vocab_shard(x: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's slice ``x[..., v/tp]`` of a full-vocabulary ``x[..., v]`` (ranks
    hold contiguous id ranges, as megatron-core's vocab-parallel layers do)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    w = x.shape[-1] // tp
    return x[..., r * w : (r + 1) * w]
