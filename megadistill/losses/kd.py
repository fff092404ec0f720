"""Vocab-parallel KD loss as one ``torch.autograd.Function`` with a closed-form backward.

Logits arrive as Megatron's vocab-parallel shards ``logits[s, b, v/tp]`` (``parallel_output=True``).
The forward pass does all the communication (a few ``[c]``-sized all-reduces per token chunk, plus a
``[c, k*tp]`` all-gather for top-k truncation) and stores ∂loss/∂logits for the local shard; the
backward pass only scales it by the incoming gradient. No rank ever holds a full-vocabulary tensor.

The same Function computes the training objective ``(1-α)·LM + α·KD``
(:func:`vocab_parallel_distillation_loss`): the LM cross entropy, the KD loss, the top-1 agreement
and the gradient of the total come out of the one chunked pass; the LM term's gradient
``(1-α)(softmax(z) - onehot)`` joins the KD gradient's passes over the chunk.

One module despite its length: the per-chunk kernels, the Function whose backward replays the
gradient they store, and the thin entry points that build its targets are one computation, and
the chunk kernels' conventions (buffers, scaling, masked rows) hold only between them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from megadistill.losses import divergences as D
from megadistill.losses.config import KDLossConfig
from megadistill.losses.parallel import all_reduce_, default_tp_group, group_rank, group_size
from megadistill.losses.softmax import global_max, global_max_argmax, normalize_, softmax_into
from megadistill.losses.targets import NEG_INF, DenseTarget, SparseTarget

Target = Union[DenseTarget, SparseTarget]
# Default chunk size, in logits per work buffer. On CPU, 4 M (16 MB fp32) buffers stay under
# glibc's mmap threshold and are reused without page faults (measured: ~20 % faster than 64 MB);
# 1 M buffers were ~15 % faster in one process but 1.5x slower at TP = 2 on gloo, where each chunk's
# few collectives cost latency. On GPUs larger chunks amortise kernel launches and all-reduce
# latency.
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 22}
AUTO_CHUNK_ELEMENTS_DEFAULT = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits accumulate in fp32; float64 (used by the gradient tests) stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Buffers:
    """Work buffers ``[chunk, v/tp]`` allocated on first use and reused by every chunk (fresh large
    allocations cost page faults on CPU and allocator churn on GPU)."""

    def __init__(self, rows: int, like: torch.Tensor) -> None:
        self.rows, self.like = rows, like
        self._bufs: dict[str, torch.Tensor] = {}

    def share(self, name: str, tensor: torch.Tensor) -> None:
        """Serve ``name`` from ``tensor[rows, v/tp]``, a buffer of the caller's (see
        :func:`scratch_may_overwrite_teacher`)."""
        self._bufs[name] = tensor

    def get(self, name: str, c: int) -> torch.Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty((self.rows, self.like.shape[-1]), dtype=self.like.dtype, device=self.like.device)
        return self._bufs[name][:c]


def _fused_kl(cfg: KDLossConfig) -> bool:
    """Losses whose gradient is ``p - q`` (forward KL, soft CE, JSD at β = 0): their student softmax
    becomes the gradient in place and their cross term is computed before it."""
    return cfg.loss in ("forward_kl", "soft_ce") or (cfg.loss == "jsd" and cfg.jsd_beta == 0.0)


def scratch_may_overwrite_teacher(cfg: KDLossConfig) -> bool:
    """Whether the ``"scratch"`` work buffer may be a dense teacher's own logits buffer.

    Forward KL and soft CE read a dense teacher's raw logits ``t.x`` last in their cross term
    (:func:`divergences.forward_kl_cross`, whose first write into the scratch buffer is the
    element-wise ``t.x - x``, or at soft CE ``x - m`` with ``t.x`` unread); later uses of the
    buffer (the student's ghost mass) come after it. ``renormalize_both`` fills the buffer before
    the cross term, and the other losses read ``t.x`` after it, so they keep a buffer of their own.
    """
    return _fused_kl(cfg) and cfg.truncation != "renormalize_both"


def _mse_chunk(x: torch.Tensor, target: DenseTarget, a: int, b: int, cfg: KDLossConfig, group, out: torch.Tensor):
    """Mean over the global vocabulary of ((z_s - z_t)/τ)²; gradient 2 (z_s - z_t) / (V τ²)."""
    inv_t = 1.0 / cfg.temperature
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    torch.sub(x, target.raw_chunk(a, b, out.dtype), out=out).mul_(inv_t)
    vocab = out.shape[-1] * group_size(group)
    loss = all_reduce_(torch.linalg.vecdot(out, out), dist.ReduceOp.SUM, group) / vocab
    out.mul_(2.0 * inv_t * scale / vocab)
    return loss * scale


def _kd_part(
    x: torch.Tensor,
    target: Target,
    a: int,
    b: int,
    m: torch.Tensor,
    cfg: KDLossConfig,
    group,
    out: torch.Tensor,
    bufs: _Buffers,
    weight: float = 1.0,
    lm_weight: float = 0.0,
    d: Optional[torch.Tensor] = None,
    e1: Optional[torch.Tensor] = None,
    top1: bool = False,
):
    """KD loss ``[c]`` of tokens ``a:b`` against ``target``; writes ``weight·∂KD/∂z`` into
    ``out[c, v/tp]`` (which may be ``x`` itself: every read of the raw logits happens before the
    softmax overwrites them).

    ``m[c]`` is the global row max of ``x``. ``lm_weight`` > 0 adds ``lm_weight·softmax(z)`` to
    ``out`` in the same passes; only where the KD's own student softmax is ``softmax(z)`` (τ = 1,
    not ``mse``, not ``renormalize_both``). ``d[c, v/tp] = x - m`` or, at τ = 2, ``e1 = exp(x - m)``,
    if the caller has it, serves the student's ``softmax(z/τ)`` without reading ``x`` again.

    Returns ``(loss[c], log_s[c] or None, teacher_top1[c] or None, row_scale[c] or None)``:
    ``log_s`` is the student softmax's
    log-normaliser relative to ``m``; ``top1`` asks for the teacher's argmax id; with a
    ``row_scale`` r, ``out`` holds the gradient divided by r, row by row (see
    :class:`_VocabParallelObjective`).
    """
    inv_t = 1.0 / cfg.temperature
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    if cfg.loss == "mse":
        t_top1 = global_max_argmax(target.raw_chunk(a, b, out.dtype), group)[1] if top1 else None
        loss = _mse_chunk(x, target, a, b, cfg, group, out)
        if weight != 1.0:
            out.mul_(weight)
        return loss, None, t_top1, None
    c = b - a
    fused = _fused_kl(cfg)
    # Forward KL and soft CE read sparse targets as a list of entries: no [c, v/tp] q to make.
    dense = not fused or isinstance(target, DenseTarget)
    t = target.chunk(a, b, out.dtype, q_out=bufs.get("q", c) if dense else None, top1=top1, dense=dense)
    # ModelOpt's top-K convention: the student is compared on the kept ids alone, renormalised there.
    both = cfg.truncation == "renormalize_both" and t.kept is not None
    ms = m
    if both:
        # Its softmax over the kept ids is taken relative to its own maximum over them: the global
        # maximum may be truncated away, and the kept ids' weights relative to it could underflow.
        ms = global_max(bufs.get("scratch", c).copy_(x).masked_fill_(~t.kept, NEG_INF), group)
    soft_ce = cfg.loss == "soft_ce"
    cross = D.forward_kl_cross(t, x, inv_t, ms, bufs.get("scratch", c), soft_ce) if fused else None

    ghost_lse = ghost_w = None
    if t.kept is not None and not both:
        # The student's log-mass on the truncated ids, in log space (relative to their own max)
        # so that a confident student does not underflow it.
        z = torch.sub(x, m.unsqueeze(-1), out=bufs.get("scratch", c))
        if inv_t != 1.0:
            z.mul_(inv_t)
        z.masked_fill_(t.kept, NEG_INF)
        mg = global_max(z, group)  # -inf where no id is truncated
        mg = torch.where(torch.isfinite(mg), mg, torch.zeros_like(mg))
        w = z.sub_(mg.unsqueeze(-1)).exp_()
        sg = all_reduce_(w.sum(-1), dist.ReduceOp.SUM, group)
        ghost_lse = mg + torch.log(sg)
        if fused and cfg.truncation == "ghost":
            # Forward KL's gradient on the truncated ids needs the student's distribution within them.
            ghost_w = w.mul_(torch.where(sg > 0, sg.reciprocal(), torch.zeros_like(sg)).unsqueeze(-1))

    # d/dz = (1/τ)·d/d(z/τ), times τ² if scaled; the objective's weights fold into the same pass.
    k = weight * inv_t * scale
    if fused:
        # Forward KL and soft CE turn the student softmax into their gradient in place in ``out``:
        # k(p - w·q) = (k/Σe)·(e - w·Σe·q) with e the unnormalised exp, so the normalisation
        # (a pass over the chunk) joins the backward pass's scaling as a row factor k/Σe. At
        # τ = 1 the LM's softmax joins too: w(p - q) + λp = (w + λ)(p - w/(w + λ)·q).
        k = (weight + lm_weight) * inv_t * scale
    p = out if fused else bufs.get("p", c)
    if e1 is not None and inv_t == 0.5 and not both:
        # exp((x - m)/2) = sqrt(exp(x - m)): a square root instead of a scaling and an exp. Only
        # weights below exp(-87) (fp32) flush to zero earlier, far below any sum's resolution.
        sm = normalize_(torch.sqrt(e1, out=p), m, group, scale_rows=not fused)
    elif d is not None and inv_t != 1.0 and not both:
        sm = normalize_(torch.mul(d, inv_t, out=p).exp_(), m, group, scale_rows=not fused)
    else:
        sm = softmax_into(x, inv_t, group, p, kept=t.kept if both else None, m=ms, scale_rows=not fused)
    s = D.StudentChunk(p=p, x=x, scale=inv_t, m=ms, log_s=sm.log_s, ghost_w=ghost_w)
    if ghost_lse is not None:
        s.logp_ghost = ghost_lse - sm.log_s
    elif both:
        s.logp_ghost = torch.full_like(sm.log_s, NEG_INF)  # no student mass off the kept ids

    row_scale = None
    if fused:
        s_sum = torch.exp(sm.log_s)
        row_scale = k / s_sum
        r = D.forward_kl(t, s, out, cross, soft_ce=soft_ce, target_weight=s_sum * (weight / (weight + lm_weight)))
    elif cfg.is_reverse_kl:
        r = D.reverse_kl(t, s, out)
    else:
        r = D.jsd(t, s, out, cfg.jsd_beta)

    if r.e_local is not None:
        sums = all_reduce_(torch.stack([r.loss_local, r.e_local]), dist.ReduceOp.SUM, group)
        loss, e = sums[0], sums[1]
        if r.e_ghost is not None:
            e = e + r.e_ghost
        if lm_weight:
            e = e - lm_weight / k  # k(g - pE) + λp = k(g - p(E - λ/k))
        out.addcmul_(p, e.unsqueeze(-1), value=-1.0)
    else:
        loss = all_reduce_(r.loss_local, dist.ReduceOp.SUM, group)
    if r.loss_ghost is not None:
        loss = loss + r.loss_ghost
    if k != 1.0 and not fused:
        out.mul_(k)
    return loss * scale, sm.log_s, t.top1, row_scale


def _objective_chunk(
    x: torch.Tensor,
    target: Optional[Target],
    labels: Optional[torch.Tensor],
    alpha: float,
    a: int,
    b: int,
    cfg: KDLossConfig,
    group,
    out: torch.Tensor,
    bufs: _Buffers,
    agreement: bool,
):
    """``(total, kd, lm, agree, row_scale)``, each ``[c]`` (None if not computed), of tokens ``a:b``;
    writes ∂total/∂logits ``[c, v/tp]`` into ``out`` (which may be ``x``), divided row by row by
    ``row_scale`` if that is not None.

    ``total = (1-α)·lm + α·kd``; ``lm`` is Megatron's cross entropy ``log Σ exp z - z_label`` (τ = 1,
    labels ``[n]`` global ids), ``agree`` whether the student's and the teacher's argmax ids match.
    """
    x = x.to(out.dtype)
    c, v = b - a, x.shape[-1]
    kd = lm = t_top1 = r = None
    if labels is None:  # KD alone (α = 1)
        m, s_top1 = global_max_argmax(x, group)[:2] if agreement else (global_max(x, group), None)
        kd, _, t_top1, r = _kd_part(x, target, a, b, m, cfg, group, out, bufs, top1=agreement)
        total = kd
    else:
        lab = labels[a:b]
        start = group_rank(group) * v
        local = (lab >= start) & (lab < start + v)
        col = torch.where(local, lab - start, torch.zeros_like(lab))
        # The label's logit, read before the gradient may overwrite x, travels with the max.
        z_lab = torch.where(local, x.gather(-1, col.unsqueeze(-1)).squeeze(-1), 0.0)
        m, s_top1, z_lab = global_max_argmax(x, group, extra=z_lab)
        pred = z_lab - m  # relative to the max, as in Megatron
        lm_w = 1.0 - alpha
        if target is None:  # plain LM: Megatron's cross entropy, e - Σe·onehot times the row factor 1/Σe
            log_s1 = softmax_into(x, 1.0, group, out, m=m, scale_rows=False).log_s
            r = torch.exp(-log_s1)
        elif alpha > 0 and cfg.temperature == 1.0 and cfg.loss != "mse" and cfg.truncation != "renormalize_both":
            # The KD's student softmax is the LM's: (1-α)·softmax(z) joins the KD gradient's passes.
            kd, log_s1, t_top1, r = _kd_part(
                x, target, a, b, m, cfg, group, out, bufs, weight=alpha, lm_weight=lm_w, top1=agreement
            )
        else:
            # softmax(z) and softmax(z/τ) from one read of x: both start from d = x - m (at τ = 2,
            # from exp(d)).
            d = torch.sub(x, m.unsqueeze(-1), out=bufs.get("p1", c))
            e1 = d.exp_() if cfg.temperature == 2.0 else None
            # α = 0: the KD value is still reported, its gradient goes to a scratch buffer.
            kd_out = out if alpha > 0 else bufs.get("kd_grad", c)
            kd, _, t_top1, r = _kd_part(
                x, target, a, b, m, cfg, group, kd_out, bufs, weight=alpha if alpha > 0 else 1.0,
                d=None if e1 is not None else d, e1=e1, top1=agreement,
            )
            e1 = d.exp_() if e1 is None else e1
            s1 = all_reduce_(e1.sum(-1), dist.ReduceOp.SUM, group)
            log_s1 = torch.log(s1)
            if alpha == 0:
                r = s1.reciprocal()
                out.copy_(e1)  # the KD gradient went to its scratch buffer
            elif lm_w > 0:
                out.addcmul_(e1, (lm_w / s1 if r is None else lm_w / (s1 * r)).unsqueeze(-1))
        lm = log_s1 - pred
        if lm_w > 0:
            # -(1-α)·onehot(label), on the rank holding the label.
            out[torch.arange(c, device=out.device), col] -= local.to(out.dtype) * (lm_w if r is None else lm_w / r)
        if kd is None or alpha == 0.0:
            total = lm
        elif alpha == 1.0:
            total = kd
        else:
            total = alpha * kd + lm_w * lm
    agree = None if t_top1 is None else s_top1 == t_top1
    return total, kd, lm, agree, r


class _VocabParallelObjective(torch.autograd.Function):
    """Per-token ``(1-α)·LM + α·KD`` (and its parts) in one chunked pass; the gradient of the total
    is stored in the forward pass (in place in the logits if asked), backward only scales it.

    Where a softmax's normalisation would be one more pass over a chunk, the stored gradient is left
    divided by a per-token factor (``k/Σe``) that the backward pass multiplies in with the incoming
    gradient, in the pass it makes anyway."""

    @staticmethod
    def forward(ctx, student_logits, target, labels, alpha, cfg, group, inplace, agreement):
        v = student_logits.shape[-1]
        x = student_logits.reshape(-1, v)
        n = x.shape[0]
        cdt = _compute_dtype(x.dtype)
        auto = AUTO_CHUNK_ELEMENTS.get(x.device.type, AUTO_CHUNK_ELEMENTS_DEFAULT) // max(v, 1)
        step = max(1, min(n, cfg.chunk_tokens or auto))
        needs_grad = ctx.needs_input_grad[0]
        like = torch.empty((0, v), dtype=cdt, device=x.device)
        bufs = _Buffers(step, like)
        grad = None
        if needs_grad:
            if inplace and x.dtype == cdt and student_logits.is_contiguous() and student_logits.grad_fn is not None:
                # The gradient replaces the logits chunk by chunk, as in Megatron's CE. A detached
                # alias shares the version counter: autograd still refuses a graph that saved them.
                grad = x = student_logits.detach().view(-1, v)
            else:
                grad = torch.empty((n, v), dtype=cdt, device=x.device)
        flat_labels = None if labels is None else labels.reshape(-1).to(device=x.device, dtype=torch.long)
        total = torch.empty(n, dtype=cdt, device=x.device)
        kd = None if target is None else torch.empty_like(total)
        lm = None if labels is None else torch.empty_like(total)
        agree = torch.empty(n, dtype=torch.bool, device=x.device) if agreement and target is not None else None
        row_scale = None  # [n] factors of the stored gradient, applied with the incoming gradient
        for a in range(0, n, step):
            b = min(n, a + step)
            # Without a gradient to keep (evaluation), one chunk-sized buffer takes its place.
            out = grad[a:b] if grad is not None else bufs.get("grad", b - a)
            *parts, r = _objective_chunk(x[a:b], target, flat_labels, alpha, a, b, cfg, group, out, bufs, agreement)
            for dst, src in zip((total, kd, lm, agree), parts):
                if dst is not None:
                    dst[a:b] = src
            if r is not None:
                if row_scale is None:
                    row_scale = torch.ones(n, dtype=cdt, device=x.device)
                row_scale[a:b] = r
        ctx.bad_rows = None
        if cfg.check_finite:
            # One host sync per call. The losses are all-reduced, so every rank agrees to scan; only
            # then is a scan of the teacher logits paid for.
            finite = torch.isfinite(total).all() & (torch.isfinite(kd).all() if kd is not None else True)
            if not bool(finite):
                if target is not None:
                    target.raise_if_corrupt(0, n)
                ctx.bad_rows = (~torch.isfinite(total)).nonzero().flatten()
        ctx.row_scale = row_scale
        ctx.save_for_backward(grad if grad is not None else like)
        ctx.in_dtype = student_logits.dtype
        ctx.in_shape = student_logits.shape
        ctx.consumed = False
        extras = [t for t in (kd, lm, agree) if t is not None]
        ctx.mark_non_differentiable(*extras)
        shape = student_logits.shape[:-1]
        return tuple(None if t is None else t.view(shape) for t in (total, kd, lm, agree))

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *unused):
        if ctx.consumed:
            raise RuntimeError(
                "the vocab-parallel KD loss scales its stored gradient in place and supports one backward "
                "pass per forward; recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        g = grad_loss.reshape(-1, 1).to(grad.dtype)
        # The forward pass left per-row factors (a softmax's 1/Σe) to this pass over the gradient.
        grad.mul_(g if ctx.row_scale is None else g * ctx.row_scale.unsqueeze(-1))
        if ctx.bad_rows is not None:
            # A masked token (gradient 0) whose loss was not finite contributes 0, not 0·inf.
            rows = ctx.bad_rows[g.reshape(-1)[ctx.bad_rows] == 0]
            grad[rows] = 0.0
        return grad.to(ctx.in_dtype).view(ctx.in_shape), None, None, None, None, None, None, None


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher logits shard {tuple(teacher.shape)} does not match student logits shard "
            f"{tuple(student.shape)}; both must be [s, b, v/tp] over the same vocabulary and TP size"
        )


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    cfg: KDLossConfig,
    group="default",
    inplace: bool = False,
) -> torch.Tensor:
    """Per-token KD loss ``[s, b]`` from vocab-parallel ``student_logits[s, b, v/tp]`` and
    ``teacher_logits[s, b, v/tp]`` (no gradient flows to the teacher).

    ``group`` is the tensor-parallel process group sharing the vocabulary; by default Megatron's,
    or none outside a Megatron run. Callers mask and reduce the result, as with Megatron's cross
    entropy. ``inplace=True`` stores the gradient in the student logits' own buffer (fp32/fp64
    logits produced by a differentiable op), saving one ``[s, b, v/tp]`` buffer as Megatron's
    cross entropy does: the logits are overwritten and must not be used afterwards.
    """
    group = default_tp_group() if group == "default" else group
    _check_shapes(student_logits, teacher_logits)
    target = DenseTarget(teacher_logits, cfg, group)
    return _VocabParallelObjective.apply(student_logits, target, None, 1.0, cfg, group, inplace, False)[0]


def vocab_parallel_sparse_kd_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    cfg: KDLossConfig,
    group="default",
    validate: bool = True,
    inplace: bool = False,
    residual: Optional[torch.Tensor] = None,
    tails: Optional[torch.Tensor] = None,
    temperatures: tuple = (),
    drawn_at: Optional[float] = None,
) -> torch.Tensor:
    """Per-token KD loss ``[s, b]`` against sparse teacher targets.

    ``ids[s, b, k]`` are global vocab ids (-1 pads), ``logprobs[s, b, k]`` the teacher's τ = 1
    log-probabilities of them, identical on every tensor-parallel rank. ``validate`` checks ids and
    probabilities (one pass over ``[s, b, k]``) and raises on corrupt targets, on every rank.
    ``inplace`` as in :func:`vocab_parallel_kd_loss`. ``residual[s, b]``: the truncated mass as
    stored (the ghost bucket at τ = 1); None derives it from ``logprobs``. ``tails[s, b, T]``: the
    truncated ids' tempered log-mass at each of ``temperatures`` (the ghost bucket at τ ≠ 1);
    ``drawn_at``: RS-KD draws' temperature (see ``SparseTarget``).
    """
    group = default_tp_group() if group == "default" else group
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse targets cover tokens {tuple(ids.shape[:-1])} but student logits are "
            f"{tuple(student_logits.shape)} ([s, b, v/tp])"
        )
    target = SparseTarget(
        ids, logprobs, cfg, group, student_logits.shape[-1], student_logits.device, validate=validate,
        residual=residual, tails=tails, temperatures=temperatures, drawn_at=drawn_at,
    )
    return _VocabParallelObjective.apply(student_logits, target, None, 1.0, cfg, group, inplace, False)[0]


class DistillationTerms(NamedTuple):
    """Per-token parts of the distillation objective, each ``[s, b]`` (the logits' leading shape)."""

    total: torch.Tensor
    """``(1-α)·lm + α·kd``: the only differentiable output (its gradient is stored in the forward pass)."""
    kd: Optional[torch.Tensor]
    """The KD loss (None without a target)."""
    lm: Optional[torch.Tensor]
    """The LM cross entropy against ``labels`` at τ = 1, as Megatron's (None without labels)."""
    agree: Optional[torch.Tensor]
    """bool: the student's argmax id is the teacher's (None without a target or with ``agreement=False``)."""


def vocab_parallel_distillation_loss(
    student_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    target,
    cfg: KDLossConfig,
    alpha: float,
    group="default",
    inplace: bool = False,
    agreement: bool = True,
    validate: bool = True,
) -> DistillationTerms:
    """The distillation objective ``(1-α)·LM + α·KD`` per token, with its parts and the top-1
    agreement, from one chunked pass over vocab-parallel ``student_logits[s, b, v/tp]``.

    ``labels[s, b]`` are global vocab ids (None when α = 1: no LM term). ``target`` is the teacher:
    dense logits ``[s, b, v/tp]``, or sparse targets, any object with ``ids[s, b, k]``,
    ``logprobs[s, b, k]`` and optionally ``residual[s, b]``, ``tails[s, b, T]`` with ``temperatures`` and
    ``drawn_at`` (as ``megadistill.kd.teacher.SparseLogits``; see ``SparseTarget``), or None when α = 0 (plain LM: then the total is
    Megatron's ``vocab_parallel_cross_entropy``). The LM term is τ-free; τ applies to the KD term.

    The gradient of ``total`` — ``(1-α)(softmax(z) - onehot) + α·∂KD/∂z`` — is computed in the
    forward pass; the backward pass only scales it, without communication. ``inplace=True`` stores
    it in the logits' own buffer, as Megatron's cross entropy does (fp32/fp64 logits produced by a
    differentiable op; they must not be read afterwards). ``agreement=False`` skips the argmaxes.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"KD weight alpha must be in [0, 1], got {alpha}")
    if target is None and alpha != 0.0:
        raise ValueError(f"alpha = {alpha} > 0 needs a KD target (teacher logits or sparse targets)")
    if labels is None and alpha != 1.0:
        raise ValueError(f"alpha = {alpha} < 1 needs labels for the LM term")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match student logits {tuple(student_logits.shape)}")
    group = default_tp_group() if group == "default" else group
    built = None
    if isinstance(target, torch.Tensor):
        _check_shapes(student_logits, target)
        built = DenseTarget(target, cfg, group)
    elif target is not None:
        if target.ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"sparse targets cover tokens {tuple(target.ids.shape[:-1])} but student logits are "
                f"{tuple(student_logits.shape)} ([s, b, v/tp])"
            )
        built = SparseTarget(
            target.ids, target.logprobs, cfg, group, student_logits.shape[-1], student_logits.device,
            validate=validate, residual=getattr(target, "residual", None), tails=getattr(target, "tails", None),
            temperatures=tuple(getattr(target, "temperatures", ())), drawn_at=getattr(target, "drawn_at", None),
        )
    parts = _VocabParallelObjective.apply(student_logits, built, labels, float(alpha), cfg, group, inplace, agreement)
    return DistillationTerms(*parts)


class KDLoss(torch.nn.Module):
    """Module form of the KD loss: ``KDLoss(cfg)(student_logits, teacher_logits) -> [s, b]``."""

    def __init__(self, cfg: KDLossConfig | None = None, group="default") -> None:
        super().__init__()
        self.cfg = cfg or KDLossConfig()
        self.group = group

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_kd_loss(student_logits, teacher_logits, self.cfg, self.group)

    def sparse(self, student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_sparse_kd_loss(student_logits, ids, logprobs, self.cfg, self.group)
