"""The vocab-parallel output layer and the distillation objective in one chunked pass.

The student's logits ``hidden @ weight.T`` (``[n, v/tp]`` per rank) exist one token chunk at a
time: each chunk's logits are made, turned into ∂total/∂logits by the objective's chunk kernel
(:func:`megadistill.losses.kd._objective_chunk`, the same one the unfused loss runs), scaled by the
tokens' reduction weights and folded straight into ∂loss/∂hidden and ∂loss/∂weight. An online
teacher's logits ``teacher_hidden @ teacher_weight.T`` are made per chunk too. Neither the
``[n, v/tp]`` logits nor their gradient is ever held whole: the working set is a few ``[c, v/tp]``
chunk buffers besides the ``[v/tp, h]`` weight gradient the layer needs anyway.

Because the reduction weights are inputs, the reduced loss ``Σ_i weights_i · total_i`` is the one
differentiable output, and its gradients are complete when the forward pass returns; the backward
pass only scales them by the incoming scalar gradient (one backward per forward, as the unfused
loss).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megadistill.losses.config import KDLossConfig
from megadistill.losses.kd import _Buffers, _compute_dtype, _objective_chunk, scratch_may_overwrite_teacher
from megadistill.losses.parallel import default_tp_group
from megadistill.losses.targets import DenseTarget, SparseTarget, _raise_if_non_finite

# Chunk size, in logits per ``[c, v/tp]`` work buffer (three to five are live: the student's
# logits, which become their gradient in place, the teacher's logits, which forward KL and soft CE
# also use as scratch, its probabilities, a scratch buffer for the other losses, and at τ ≠ 1 the
# student's τ = 1 exponentials). Every chunk also re-reads the ``[v/tp, h]`` weights in three
# products and reads and writes the weight gradient once; with few rows those products run well
# below the machine's rate (on the 2-core CPU of bench/fused_output.py, 64-row chunks took 2.6x
# the unfused time, 128-row chunks 1.4x), so a chunk holds at least MIN_ROWS tokens, fewer for
# small hidden sizes (h/8: narrow weights are cheap to re-read), whatever the budget.
FUSED_CHUNK_ELEMENTS = {"cpu": 1 << 23}
FUSED_CHUNK_ELEMENTS_DEFAULT = 1 << 26
MIN_ROWS = {"cpu": 128}
MIN_ROWS_DEFAULT = 256


class FusedTerms(NamedTuple):
    """What :func:`fused_output_distillation` returns; per-token parts are ``[n]``."""

    loss: torch.Tensor
    """``[]`` ``Σ_i weights_i · total_i``: the only differentiable output."""
    total: torch.Tensor
    """``[n]`` ``(1-α)·lm + α·kd``, detached (as ``DistillationTerms.total``, before reduction)."""
    kd: Optional[torch.Tensor]
    """``[n]`` the KD loss, or None without a teacher."""
    lm: Optional[torch.Tensor]
    """``[n]`` the LM cross entropy at τ = 1, or None without labels."""
    agree: Optional[torch.Tensor]
    """``[n]`` bool: the student's argmax id is the teacher's (None without a teacher or agreement)."""


def chunk_rows(n: int, v_local: int, hidden_size: int, device: torch.device, chunk_tokens: Optional[int]) -> int:
    """Tokens per chunk: ``chunk_tokens`` if set, else as many as fit the per-buffer element budget
    for a ``v_local``-wide shard, but never fewer than the rows that amortise a pass over the
    ``[v_local, hidden_size]`` weights (capped by ``hidden_size``: wider rows do more work per pass)."""
    if chunk_tokens:
        return max(1, min(n, chunk_tokens))
    budget = FUSED_CHUNK_ELEMENTS.get(device.type, FUSED_CHUNK_ELEMENTS_DEFAULT) // max(v_local, 1)
    floor = min(MIN_ROWS.get(device.type, MIN_ROWS_DEFAULT), max(1, hidden_size // 8))
    return max(1, min(n, max(budget, floor)))


class _ChunkDenseTarget(DenseTarget):
    """An online teacher's logits for one chunk ``[c, v/tp]``, indexed by the chunk's global token
    range ``a0:a0+c`` as the objective's chunk kernel asks for it."""

    def __init__(self, logits: torch.Tensor, a0: int, cfg: KDLossConfig, group) -> None:
        super().__init__(logits, cfg, group)
        self.a0 = a0

    def raw_chunk(self, a, b, dtype):
        return super().raw_chunk(a - self.a0, b - self.a0, dtype)

    def chunk(self, a, b, dtype, q_out=None, top1=False, dense=True):
        return super().chunk(a - self.a0, b - self.a0, dtype, q_out=q_out, top1=top1)

    def raise_if_corrupt(self, a, b):
        logits = self.logits[a - self.a0 : b - self.a0]
        _raise_if_non_finite(logits, "online teacher logits", self.group, token_offset=a)


def _matmul_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a[c, h] @ b[v, h].T`` into ``out[c, v]`` (which may be of a wider dtype than ``a``, ``b``)."""
    if out.dtype == a.dtype:
        return torch.mm(a, b.t(), out=out)
    return out.copy_(torch.mm(a, b.t()))


class _FusedOutputObjective(torch.autograd.Function):
    """Loss ``Σ w·total`` of the output layer ``hidden @ weight.T`` with gradients stored in the
    forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, alpha, cfg, group, target, teacher, agreement):
        n, h = hidden.shape
        v = weight.shape[0]
        dt, cdt = hidden.dtype, _compute_dtype(hidden.dtype)
        dev = hidden.device
        step = chunk_rows(n, v, h, dev, cfg.chunk_tokens)
        need_h, need_w = ctx.needs_input_grad[:2]
        needs = need_h or need_w
        bufs = _Buffers(step, torch.empty((0, v), dtype=cdt, device=dev))
        w = weights.reshape(-1).to(device=dev, dtype=cdt)
        grad_hidden = torch.empty((n, h), dtype=dt, device=dev) if need_h else None
        # The weight gradient sums over every chunk: in fp32 for half inputs.
        grad_weight = torch.zeros((v, h), dtype=cdt, device=dev) if need_w else None
        teacher_buf = None
        if teacher is not None:
            t_hidden, t_weight = teacher
            teacher_buf = torch.empty((step, v), dtype=t_hidden.dtype, device=dev)
            if teacher_buf.dtype == cdt and scratch_may_overwrite_teacher(cfg):
                # The teacher's logits are read last where the scratch buffer is first written:
                # one [c, v/tp] buffer fewer (three in all at τ = 1).
                bufs.share("scratch", teacher_buf)
        total = torch.empty(n, dtype=cdt, device=dev)
        has_t = target is not None or teacher is not None
        kd = torch.empty_like(total) if has_t else None
        lm = None if labels is None else torch.empty_like(total)
        agree = torch.empty(n, dtype=torch.bool, device=dev) if agreement and has_t else None
        for a in range(0, n, step):
            b = min(n, a + step)
            c = b - a
            hc = hidden[a:b]
            # The logits become their own gradient in place (the chunk kernel allows out = x).
            x = _matmul_nt(hc, weight, bufs.get("logits", c))
            tgt = target
            if teacher is not None:
                tgt = _ChunkDenseTarget(_matmul_nt(t_hidden[a:b], t_weight, teacher_buf[:c]), a, cfg, group)
            *parts, r = _objective_chunk(x, tgt, labels, alpha, a, b, cfg, group, x, bufs, agreement)
            for dst, src in zip((total, kd, lm, agree), parts):
                if dst is not None:
                    dst[a:b] = src
            if cfg.check_finite:
                # One host sync per chunk. The losses are all-reduced, so every rank takes the same
                # branch; corrupt teacher logits raise on all of them.
                finite = torch.isfinite(parts[0]) & (torch.isfinite(parts[1]) if parts[1] is not None else True)
                if not bool(finite.all()):
                    if teacher is not None:  # its logits may have been overwritten: made again to scan
                        _matmul_nt(t_hidden[a:b], t_weight, teacher_buf[:c])
                    if tgt is not None:
                        tgt.raise_if_corrupt(a, b)
                    # A token of weight 0 whose loss is not finite adds 0, not 0·inf, to the gradients.
                    x[(w[a:b] == 0) & ~finite] = 0.0
            if not needs:
                continue
            wc = w[a:b]
            # Zero-weight rows get factor 0 even where the row factor r is not finite.
            s = wc if r is None else torch.where(wc != 0, r * wc, torch.zeros_like(wc))
            g = x.mul_(s.unsqueeze(-1))
            if g.dtype != dt:  # half inputs: the gradient's products run in their dtype, as Megatron's
                g = g.to(dt)
            if need_h:
                torch.mm(g, weight, out=grad_hidden[a:b])
            if need_w and g.dtype == cdt:
                grad_weight.addmm_(g.t(), hc)
            elif need_w:
                grad_weight.add_(torch.mm(g.t(), hc))
        # Masked tokens (weight 0) count 0 even where their loss is not finite.
        loss = torch.where(w != 0, w * total, torch.zeros_like(total)).sum()
        ctx.grads = (grad_hidden, grad_weight)
        ctx.dtypes = (dt, weight.dtype)
        ctx.consumed = False
        ctx.mark_non_differentiable(*[t for t in (total, kd, lm, agree) if t is not None])
        return loss, total, kd, lm, agree

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.consumed:
            raise RuntimeError(
                "the fused output-layer loss scales its stored gradients in place and supports one backward "
                "pass per forward; recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        outs = []
        for g, dtype, needed in zip((grad_hidden, grad_weight), ctx.dtypes, ctx.needs_input_grad[:2]):
            if g is None or not needed:
                outs.append(None)
                continue
            scale = grad_loss.to(g.dtype)
            outs.append(g.mul_(scale).to(dtype))
        return (*outs, None, None, None, None, None, None, None, None)


def fused_output_distillation(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: torch.Tensor,
    alpha: float,
    cfg: KDLossConfig,
    group="default",
    *,
    target=None,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    agreement: bool = True,
    validate: bool = True,
) -> FusedTerms:
    """The vocab-parallel output layer and the objective ``Σ_i weights_i·((1-α)·LM_i + α·KD_i)``
    without the ``[n, v/tp]`` logits or their gradient ever held whole.

    ``hidden[n, h]``: the student's final hidden states (after the final norm), the same on every
    tensor-parallel rank (``[s, b, h]`` is flattened to tokens; per-token outputs are ``[n]``);
    ``weight[v/tp, h]``: this rank's shard of the vocab-parallel output weight (ranks hold
    contiguous id ranges; a tied embedding passes its own weight, whose gradient then
    sums both uses). ``labels[n]``: global ids (None when α = 1). ``weights[n]``: per-token
    reduction weights (the loss mask, possibly divided by the token count). ``group``: the
    tensor-parallel group, Megatron's by default.

    The teacher is either ``target`` — sparse targets (an object with ``ids[n, k]``,
    ``logprobs[n, k]`` and optionally ``residual``, ``tails``, ``temperatures``, ``drawn_at``, as
    ``SparseLogits``), dense teacher logits ``[n, v/tp]``, or None when α = 0 — or an online
    teacher's ``teacher_hidden[n, h_t]`` and ``teacher_weight[v/tp, h_t]`` (no gradient), whose
    logits are made one chunk at a time too. ``validate`` checks sparse targets (as
    ``vocab_parallel_distillation_loss``); ``agreement=False`` skips the argmaxes.

    The gradient w.r.t. ``hidden`` is this rank's partial sum over its vocab shard: as with
    megatron-core's ``ColumnParallelLinear``, the caller passes ``hidden`` through
    ``copy_to_tensor_model_parallel_region`` (``gather_from_sequence_parallel_region`` under
    sequence parallelism), whose backward all-reduces it over the group. Gradients come in the
    inputs' dtypes; the weight gradient is summed over chunks in fp32 for bf16/fp16 inputs.

    The chunk size is automatic (see :func:`chunk_rows`) unless ``cfg.chunk_tokens`` is set.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"KD weight alpha must be in [0, 1], got {alpha}")
    online = teacher_hidden is not None or teacher_weight is not None
    if online and (teacher_hidden is None or teacher_weight is None or target is not None):
        raise ValueError("an online teacher needs both teacher_hidden and teacher_weight, and no target")
    if not online and target is None and alpha != 0.0:
        raise ValueError(f"alpha = {alpha} > 0 needs a KD target (a teacher or sparse targets)")
    if labels is None and alpha != 1.0:
        raise ValueError(f"alpha = {alpha} < 1 needs labels for the LM term")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [n, h] and weight {tuple(weight.shape)} [v/tp, h]")
    # Megatron's [s, b, h] flattens to tokens (differentiably, outside the Function).
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    n, v = hidden.shape[0], weight.shape[0]
    if weights.numel() != n or (labels is not None and labels.numel() != n):
        raise ValueError(f"weights {tuple(weights.shape)} and labels must hold one entry per token ({n})")
    if online and (teacher_hidden.shape[0] != n or teacher_weight.shape[0] != v
                   or teacher_hidden.shape[1] != teacher_weight.shape[1]):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [{n}, h_t] and teacher_weight "
                         f"{tuple(teacher_weight.shape)} [{v}, h_t]")
    group = default_tp_group() if group == "default" else group
    built = None
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1, target.shape[-1])
        if target.shape != (n, v):
            raise ValueError(f"dense teacher logits {tuple(target.shape)} must be [{n}, {v}]")
        built = DenseTarget(target, cfg, group)
    elif target is not None:
        if target.ids.shape[:-1].numel() != n:
            raise ValueError(f"sparse targets cover {tuple(target.ids.shape[:-1])} tokens, hidden has {n}")
        built = SparseTarget(
            target.ids.reshape(n, -1), target.logprobs.reshape(n, -1), cfg, group, v, hidden.device,
            validate=validate, residual=_flat(getattr(target, "residual", None), n),
            tails=_flat(getattr(target, "tails", None), n, keep_last=True),
            temperatures=tuple(getattr(target, "temperatures", ())), drawn_at=getattr(target, "drawn_at", None),
        )
    flat_labels = None if labels is None else labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    teacher = (teacher_hidden.detach(), teacher_weight.detach()) if online else None
    parts = _FusedOutputObjective.apply(
        hidden, weight, flat_labels, weights, float(alpha), cfg, group, built, teacher, agreement
    )
    return FusedTerms(*parts)


def _flat(t: Optional[torch.Tensor], n: int, keep_last: bool = False) -> Optional[torch.Tensor]:
    """Per-token side inputs of sparse targets with their token dims flattened to ``[n]`` (``[n, T]``)."""
    if t is None:
        return None
    return t.reshape(n, t.shape[-1]) if keep_last else t.reshape(n)
