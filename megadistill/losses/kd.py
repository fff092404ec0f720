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
from megadistill.losses.softmax import softmax_into
from megadistill.losses.targets import DenseTarget, SparseTarget

Target = Union[DenseTarget, SparseTarget]
# Default chunk size, in logits per work buffer. On CPU, 4 M (16 MB fp32) buffers stay under
# glibc's mmap threshold and are reused without page faults (measured: ~20 % faster than 64 MB);
# on GPUs larger chunks amortise kernel launches and all-reduce latency.
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 22}
AUTO_CHUNK_ELEMENTS_DEFAULT = 1 << 25


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits accumulate in fp32; float64 (used by the gradient tests) stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mse_chunk(x: torch.Tensor, target: DenseTarget, a: int, b: int, cfg: KDLossConfig, group, out: torch.Tensor):
    """Mean over the global vocabulary of ((z_s - z_t)/τ)²; gradient 2 (z_s - z_t) / (V τ²)."""
    inv_t = 1.0 / cfg.temperature
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    torch.sub(x, target.raw_chunk(a, b, out.dtype), out=out).mul_(inv_t)
    vocab = out.shape[-1] * group_size(group)
    loss = all_reduce_(torch.linalg.vecdot(out, out), dist.ReduceOp.SUM, group) / vocab
    out.mul_(2.0 * inv_t * scale / vocab)
    return loss * scale


class _Buffers:
    """Work buffers ``[chunk, v/tp]`` allocated once per forward and reused by every chunk
    (fresh large allocations cost page faults on CPU and allocator churn on GPU)."""

    def __init__(self, rows: int, like: torch.Tensor) -> None:
        self.rows, self.like = rows, like
        self._q = self._scratch = None

    def q(self, c: int) -> torch.Tensor:
        if self._q is None:
            self._q = torch.empty((self.rows, self.like.shape[-1]), dtype=self.like.dtype, device=self.like.device)
        return self._q[:c]

    def scratch(self, c: int) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty((self.rows, self.like.shape[-1]), dtype=self.like.dtype, device=self.like.device)
        return self._scratch[:c]


def _kd_chunk(
    x: torch.Tensor, target: Target, a: int, b: int, cfg: KDLossConfig, group, out: torch.Tensor, bufs: _Buffers
):
    """Per-token loss ``[c]`` of tokens ``a:b``; writes d loss / d logits ``[c, v/tp]`` into ``out``."""
    x = x.to(out.dtype)
    if cfg.loss == "mse":
        return _mse_chunk(x, target, a, b, cfg, group, out)
    inv_t = 1.0 / cfg.temperature
    c = b - a
    t = target.chunk(a, b, out.dtype, q_out=bufs.q(c))
    # Forward KL and soft CE turn the student softmax into their gradient in place in ``out``
    # (which may be the student logits themselves): read the logits they need first.
    fused = cfg.loss in ("forward_kl", "soft_ce") or (cfg.loss == "jsd" and cfg.jsd_beta == 0.0)
    soft_ce = cfg.loss == "soft_ce"
    cross = D.forward_kl_cross(t, x, inv_t, bufs.scratch(c), soft_ce) if fused else None
    p = out if fused else torch.empty_like(out)
    sm = softmax_into(x, inv_t, group, p)
    logp_ghost = None
    if t.kept is not None:
        logp_ghost = torch.log(all_reduce_(torch.where(t.kept, 0.0, p).sum(-1), dist.ReduceOp.SUM, group))
    s = D.StudentChunk(p=p, x=x, scale=inv_t, log_norm=sm.log_norm, logp_ghost=logp_ghost)

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
    if cfg.check_finite and not bool(torch.isfinite(loss).all()):
        # Only now pay for a scan: a non-finite loss is the symptom of a corrupt teacher.
        target.raise_if_corrupt(a, b)
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
        if inplace and x.dtype == cdt and student_logits.is_contiguous():
            # The gradient replaces the logits chunk by chunk, as in Megatron's CE. A detached alias
            # shares the version counter: autograd still refuses a graph that saved the logits.
            grad = x = student_logits.detach().view(-1, v)
        else:
            grad = torch.empty((n, v), dtype=cdt, device=x.device)
        loss = torch.empty(n, dtype=cdt, device=x.device)
        auto = AUTO_CHUNK_ELEMENTS.get(x.device.type, AUTO_CHUNK_ELEMENTS_DEFAULT) // max(v, 1)
        step = max(1, min(n, cfg.chunk_tokens or auto))
        bufs = _Buffers(step, grad)
        for a in range(0, n, step):
            b = min(n, a + step)
            loss[a:b] = _kd_chunk(x[a:b], target, a, b, cfg, group, grad[a:b], bufs)
        ctx.save_for_backward(grad)
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
        grad.mul_(grad_loss.reshape(-1, 1).to(grad.dtype))
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
    logits), saving one ``[s, b, v/tp]`` buffer as Megatron's cross entropy does: the logits are
    overwritten and must not be used afterwards.
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
    probabilities (one pass over ``[s, b, k]``) and raises on corrupt targets. ``inplace`` as in
    :func:`vocab_parallel_kd_loss`.
    """
    group = default_tp_group() if group == "default" else group
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse targets cover tokens {tuple(ids.shape[:-1])} but student logits are "
            f"{tuple(student_logits.shape)} ([s, b, v/tp])"
        )
    target = SparseTarget(ids, logprobs, cfg, group, student_logits.shape[-1], validate=validate)
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
