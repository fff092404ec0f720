"""Vocab-parallel KD loss as one ``torch.autograd.Function`` with a closed-form backward.

Logits arrive as Megatron's vocab-parallel shards ``logits[s, b, v/tp]`` (``parallel_output=True``).
The forward pass does all the communication (a few ``[c]``-sized all-reduces per token chunk, plus a
``[c, k*tp]`` all-gather for top-k truncation) and stores ∂loss/∂logits for the local shard; the
backward pass only scales it by the incoming gradient. No rank ever holds a full-vocabulary tensor.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist

from megadistill.losses import divergences as D
from megadistill.losses.config import KDLossConfig
from megadistill.losses.parallel import all_reduce_, default_tp_group, group_size
from megadistill.losses.softmax import global_max, softmax_into
from megadistill.losses.targets import NEG_INF, DenseTarget, SparseTarget

Target = Union[DenseTarget, SparseTarget]
# Default chunk size, in logits per work buffer. On CPU, 4 M (16 MB fp32) buffers stay under
# glibc's mmap threshold and are reused without page faults (measured: ~20 % faster than 64 MB);
# on GPUs larger chunks amortise kernel launches and all-reduce latency.
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

    def get(self, name: str, c: int) -> torch.Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty((self.rows, self.like.shape[-1]), dtype=self.like.dtype, device=self.like.device)
        return self._bufs[name][:c]


def _mse_chunk(x: torch.Tensor, target: DenseTarget, a: int, b: int, cfg: KDLossConfig, group, out: torch.Tensor):
    """Mean over the global vocabulary of ((z_s - z_t)/τ)²; gradient 2 (z_s - z_t) / (V τ²)."""
    inv_t = 1.0 / cfg.temperature
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    torch.sub(x, target.raw_chunk(a, b, out.dtype), out=out).mul_(inv_t)
    vocab = out.shape[-1] * group_size(group)
    loss = all_reduce_(torch.linalg.vecdot(out, out), dist.ReduceOp.SUM, group) / vocab
    out.mul_(2.0 * inv_t * scale / vocab)
    return loss * scale


def _kd_chunk(
    x: torch.Tensor, target: Target, a: int, b: int, cfg: KDLossConfig, group, out: torch.Tensor, bufs: _Buffers
):
    """Per-token loss ``[c]`` of tokens ``a:b``; writes d loss / d logits ``[c, v/tp]`` into ``out``
    (which may be ``x`` itself: every read of the raw logits happens before the softmax overwrites them)."""
    x = x.to(out.dtype)
    if cfg.loss == "mse":
        return _mse_chunk(x, target, a, b, cfg, group, out)
    inv_t = 1.0 / cfg.temperature
    c = b - a
    t = target.chunk(a, b, out.dtype, q_out=bufs.get("q", c))
    m = global_max(x, group)
    fused = cfg.loss in ("forward_kl", "soft_ce") or (cfg.loss == "jsd" and cfg.jsd_beta == 0.0)
    soft_ce = cfg.loss == "soft_ce"
    cross = D.forward_kl_cross(t, x, inv_t, m, bufs.get("scratch", c), soft_ce) if fused else None

    ghost_lse = ghost_w = None
    if t.kept is not None:
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

    # Forward KL and soft CE turn the student softmax into their gradient in place in ``out``.
    p = out if fused else torch.empty_like(out)
    sm = softmax_into(x, inv_t, group, p, m=m)
    s = D.StudentChunk(p=p, x=x, scale=inv_t, m=m, log_s=sm.log_s, ghost_w=ghost_w)
    if ghost_lse is not None:
        s.logp_ghost = ghost_lse - sm.log_s

    if fused:
        r = D.forward_kl(t, s, out, cross, soft_ce=soft_ce)
    elif cfg.is_reverse_kl:
        r = D.reverse_kl(t, s, out)
    else:
        r = D.jsd(t, s, out, cfg.jsd_beta)

    if r.e_local is not None:
        sums = all_reduce_(torch.stack([r.loss_local, r.e_local]), dist.ReduceOp.SUM, group)
        loss, e = sums[0], sums[1]
        if r.e_ghost is not None:
            e = e + r.e_ghost
        out.addcmul_(p, e.unsqueeze(-1), value=-1.0)
    else:
        loss = all_reduce_(r.loss_local, dist.ReduceOp.SUM, group)
    if r.loss_ghost is not None:
        loss = loss + r.loss_ghost
    # d/dz = (1/τ)·d/d(z/τ), times τ² if scaled.
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    if inv_t * scale != 1.0:
        out.mul_(inv_t * scale)
    return loss * scale


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, target: Target, cfg: KDLossConfig, group, inplace: bool):
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
        loss = torch.empty(n, dtype=cdt, device=x.device)
        for a in range(0, n, step):
            b = min(n, a + step)
            # Without a gradient to keep (evaluation), one chunk-sized buffer takes its place.
            out = grad[a:b] if grad is not None else bufs.get("grad", b - a)
            loss[a:b] = _kd_chunk(x[a:b], target, a, b, cfg, group, out, bufs)
        ctx.bad_rows = None
        if cfg.check_finite and not bool(torch.isfinite(loss).all()):
            # One host sync per call. The loss is all-reduced, so every rank agrees to scan; only
            # then is a scan of the teacher logits paid for.
            target.raise_if_corrupt(0, n)
            ctx.bad_rows = (~torch.isfinite(loss)).nonzero().flatten()
        ctx.save_for_backward(grad if grad is not None else like)
        ctx.in_dtype = student_logits.dtype
        ctx.in_shape = student_logits.shape
        ctx.consumed = False
        return loss.view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError(
                "the vocab-parallel KD loss scales its stored gradient in place and supports one backward "
                "pass per forward; recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        g = grad_loss.reshape(-1, 1).to(grad.dtype)
        grad.mul_(g)
        if ctx.bad_rows is not None:
            # A masked token (gradient 0) whose loss was not finite contributes 0, not 0·inf.
            rows = ctx.bad_rows[g.reshape(-1)[ctx.bad_rows] == 0]
            grad[rows] = 0.0
        return grad.to(ctx.in_dtype).view(ctx.in_shape), None, None, None, None


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
    return _VocabParallelKD.apply(student_logits, target, cfg, group, inplace)


def vocab_parallel_sparse_kd_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    cfg: KDLossConfig,
    group="default",
    validate: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-token KD loss ``[s, b]`` against sparse teacher targets.

    ``ids[s, b, k]`` are global vocab ids (-1 pads), ``logprobs[s, b, k]`` the teacher's τ = 1
    log-probabilities of them, identical on every tensor-parallel rank. ``validate`` checks ids and
    probabilities (one pass over ``[s, b, k]``) and raises on corrupt targets, on every rank.
    ``inplace`` as in :func:`vocab_parallel_kd_loss`.
    """
    group = default_tp_group() if group == "default" else group
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse targets cover tokens {tuple(ids.shape[:-1])} but student logits are "
            f"{tuple(student_logits.shape)} ([s, b, v/tp])"
        )
    target = SparseTarget(
        ids, logprobs, cfg, group, student_logits.shape[-1], student_logits.device, validate=validate
    )
    return _VocabParallelKD.apply(student_logits, target, cfg, group, inplace)


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
