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
from megadistill.losses.parallel import all_reduce_, default_tp_group, global_logsumexp, group_size
from megadistill.losses.targets import DenseTarget, SparseTarget

Target = Union[DenseTarget, SparseTarget]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits accumulate in fp32; float64 (used by the gradient tests) stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kd_chunk(x: torch.Tensor, target: Target, a: int, b: int, cfg: KDLossConfig, group, grad_out: torch.Tensor):
    """Loss ``[c]`` of tokens ``a:b``; writes d loss / d logits ``[c, v/tp]`` into ``grad_out``."""
    cdt = grad_out.dtype
    inv_t = 1.0 / cfg.temperature
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0

    if cfg.loss == "mse":
        zt = target.raw_chunk(a, b, cdt)
        diff = (x.to(cdt) - zt).mul_(inv_t)
        vocab = diff.shape[-1] * group_size(group)
        loss = all_reduce_(torch.linalg.vecdot(diff, diff), dist.ReduceOp.SUM, group) / vocab
        torch.mul(diff, 2.0 * inv_t * scale / vocab, out=grad_out)
        return loss * scale

    zs = x.to(cdt) * inv_t if (x.dtype != cdt or inv_t != 1.0) else x
    lse = global_logsumexp(torch.logsumexp(zs, dim=-1), group).unsqueeze(-1)
    logp = zs - lse
    t = target.chunk(a, b, cdt)
    logp_ghost = None
    if t.kept is not None:
        logp_ghost = global_logsumexp(torch.logsumexp(zs.masked_fill(t.kept, float("-inf")), -1), group) - lse.squeeze(-1)
    s = D.StudentChunk(logp=logp, p=torch.exp(logp), logp_ghost=logp_ghost)

    if cfg.loss in ("forward_kl", "soft_ce"):
        r = D.forward_kl(t, s, soft_ce=cfg.loss == "soft_ce")
    elif cfg.loss == "reverse_kl":
        r = D.reverse_kl(t, s)
    else:
        r = D.jsd(t, s, cfg.jsd_beta)

    grad = r.grad
    if r.e_local is not None:
        sums = all_reduce_(torch.stack([r.loss_local, r.e_local]), dist.ReduceOp.SUM, group)
        loss, e = sums[0], sums[1]
        if r.e_ghost is not None:
            e = e + r.e_ghost
        grad = grad.addcmul_(s.p, e.unsqueeze(-1), value=-1.0)
    else:
        loss = all_reduce_(r.loss_local, dist.ReduceOp.SUM, group)
    if r.loss_ghost is not None:
        loss = loss + r.loss_ghost
    # d/dz = (1/τ)·d/d(z/τ)
    torch.mul(grad, inv_t * scale, out=grad_out)
    return loss * scale


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, target: Target, cfg: KDLossConfig, group):
        v = student_logits.shape[-1]
        x = student_logits.reshape(-1, v)
        n = x.shape[0]
        cdt = _compute_dtype(x.dtype)
        grad = torch.empty((n, v), dtype=cdt, device=x.device)
        loss = torch.empty(n, dtype=cdt, device=x.device)
        step = cfg.chunk_tokens or max(n, 1)
        for a in range(0, n, step):
            b = min(n, a + step)
            loss[a:b] = _kd_chunk(x[a:b], target, a, b, cfg, group, grad[a:b])
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
        return grad.to(ctx.in_dtype).view(ctx.in_shape), None, None, None


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
) -> torch.Tensor:
    """Per-token KD loss ``[s, b]`` from vocab-parallel ``student_logits[s, b, v/tp]`` and
    ``teacher_logits[s, b, v/tp]`` (no gradient flows to the teacher).

    ``group`` is the tensor-parallel process group sharing the vocabulary; by default Megatron's,
    or none outside a Megatron run. Callers mask and reduce the result, as with Megatron's cross entropy.
    """
    group = default_tp_group() if group == "default" else group
    _check_shapes(student_logits, teacher_logits)
    return _VocabParallelKD.apply(student_logits, DenseTarget(teacher_logits, cfg, group), cfg, group)


def vocab_parallel_sparse_kd_loss(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    cfg: KDLossConfig,
    group="default",
    validate: bool = True,
) -> torch.Tensor:
    """Per-token KD loss ``[s, b]`` against sparse teacher targets.

    ``ids[s, b, k]`` are global vocab ids (-1 pads), ``logprobs[s, b, k]`` the teacher's τ = 1
    log-probabilities of them, identical on every tensor-parallel rank. ``validate`` checks ids and
    probabilities (one pass over ``[s, b, k]``) and raises on corrupt targets.
    """
    group = default_tp_group() if group == "default" else group
    if ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse targets cover tokens {tuple(ids.shape[:-1])} but student logits are "
            f"{tuple(student_logits.shape)} ([s, b, v/tp])"
        )
    target = SparseTarget(ids, logprobs, cfg, group, student_logits.shape[-1], validate=validate)
    return _VocabParallelKD.apply(student_logits, target, cfg, group)


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
