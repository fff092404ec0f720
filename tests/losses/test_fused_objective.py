"""The fused objective ``(1-α)·LM + α·KD`` (one pass, gradient in place) against the unfused path.

Unfused = the KD loss on its own (``vocab_parallel_kd_loss`` / ``vocab_parallel_sparse_kd_loss``,
checked against the float64 full-vocabulary reference in test_kd_losses.py), plus the LM cross
entropy and the argmaxes, each computed separately. In float64 the two must agree to 1e-12 for every
loss, truncation, dense/sparse target, α ∈ {0, 0.3, 1}, τ ∈ {1, 2}, at TP = 1, 2, 4. At α = 0
without a target the fused objective must be Megatron's ``vocab_parallel_cross_entropy``.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from kd_reference import DENSE_TRUNCATIONS, LOSSES, SPARSE_TRUNCATIONS, random_sparse_teacher, sparse_tails, vocab_shard
from megadistill.kd.teacher import SparseLogits
from megadistill.losses import (
    KDLossConfig,
    vocab_parallel_distillation_loss,
    vocab_parallel_kd_loss,
    vocab_parallel_sparse_kd_loss,
)
from megadistill.losses.parallel import vocab_parallel_argmax
from megadistill.testing import run_distributed

S, B, V, K = 3, 4, 64, 7  # 12 tokens
TOL = 1e-12

ALPHAS = [0.0, 0.3, 1.0]
TAUS = [1.0, 2.0]


def cases():
    """(cfg, sparse, alpha) for every valid combination."""
    out = []
    for sparse, truncs in ((False, DENSE_TRUNCATIONS), (True, SPARSE_TRUNCATIONS)):
        for lo in LOSSES:
            for tr in truncs:
                for tau in TAUS:
                    if lo["loss"] == "mse" and (sparse or tr):
                        continue  # mse compares logits: no truncation, no sparse targets
                    try:
                        # Uneven chunks (8 + 4 tokens) in every other case; one chunk in the rest (fewer collectives).
                        cfg = KDLossConfig(**lo, **tr, temperature=tau, scale_by_temperature_squared=tau != 1.0,
                                           chunk_tokens=8 if len(out) % 2 else None)
                    except ValueError:  # reverse KL against a renormalised teacher is rejected by design
                        assert tr.get("truncation") == "renormalize"
                        continue
                    if sparse and cfg.is_reverse_kl and cfg.truncation == "renormalize":
                        continue
                    out.extend((cfg, sparse, alpha) for alpha in ALPHAS)
    return out



def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 3.0
    labels = torch.randint(0, V, (S, B), generator=g)
    grad_out = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    # Make some student argmaxes the teacher's, so that agreement is neither always 0 nor 1.
    student[0] += 8.0 * torch.nn.functional.one_hot(teacher[0].argmax(-1), V)
    # Ids tied for the student's max across shards: the smaller id is its argmax on every TP layout,
    # so a teacher preferring the larger one disagrees (token 0) and one preferring the smaller agrees.
    student[1, 0, 3] = student[1, 0, 60] = student[1, 0].max() + 1.0
    teacher[1, 0, 60] = teacher[1, 0].max() + 1.0
    student[1, 1, 5] = student[1, 1, 40] = student[1, 1].max() + 1.0
    teacher[1, 1, 5] = teacher[1, 1].max() + 1.0
    return student.to(dtype), teacher.to(dtype), labels, grad_out.to(dtype)


def _sparse(seed: int):
    """Random top-K sparse targets with a stored residual slightly off 1 - Σ p, as an fp16 store gives,
    and the truncated ids' tempered mass at every τ ≠ 1 of ``TAUS`` (the ghost bucket there)."""
    ids, lp, teacher = random_sparse_teacher(seed, S, B, K, V)
    residual = (1.0 - lp.exp().masked_fill(ids < 0, 0.0).sum(-1)) * 0.999
    temperatures = tuple(t for t in TAUS if t != 1.0)
    return SparseLogits(ids, lp, residual, sparse_tails(teacher, ids, temperatures), temperatures)


def _lm_reference(student: torch.Tensor, labels: torch.Tensor):
    """Per-token float64 cross entropy ``[s, b]`` on the full vocabulary and its gradient ``[s, b, V]``."""
    full = student.clone().requires_grad_(True)
    lm = torch.logsumexp(full, -1) - full.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(lm.sum(), full)
    return lm.detach(), grad


def _unfused(cfg, student, target, labels, alpha):
    """``(total, kd, lm, agree, ∂(Σ total·g)/∂shard)`` with g = 1, from the separate pieces."""
    group = parallel_state.get_tensor_model_parallel_group()
    mine = vocab_shard(student).clone().requires_grad_(True)
    if isinstance(target, SparseLogits):
        kd = vocab_parallel_sparse_kd_loss(mine, target.ids, target.logprobs, cfg, residual=target.residual,
                                           tails=target.tails, temperatures=target.temperatures)
        t_top1 = target.ids.gather(
            -1, target.logprobs.masked_fill(target.ids < 0, float("-inf")).argmax(-1, keepdim=True)
        ).squeeze(-1)
    else:
        kd = vocab_parallel_kd_loss(mine, vocab_shard(target), cfg)
        t_top1 = vocab_parallel_argmax(vocab_shard(target), group)
    (g_kd,) = torch.autograd.grad(kd.sum(), mine)
    lm, g_lm = _lm_reference(student, labels)
    agree = vocab_parallel_argmax(vocab_shard(student), group) == t_top1
    if alpha == 0.0:
        total, grad = lm, vocab_shard(g_lm)
    elif alpha == 1.0:
        total, grad = kd.detach(), g_kd
    else:
        total, grad = alpha * kd.detach() + (1 - alpha) * lm, alpha * g_kd + (1 - alpha) * vocab_shard(g_lm)
    return total, kd.detach(), lm, agree, grad


def _fused(cfg, student, target, labels, alpha, grad_out, inplace):
    leaf = vocab_shard(student).clone().requires_grad_(True)
    # In place needs logits made by a differentiable op, as the output layer's.
    x = leaf * 1.0 if inplace else leaf
    tgt = target if isinstance(target, SparseLogits) or target is None else vocab_shard(target)
    terms = vocab_parallel_distillation_loss(x, labels if alpha < 1 else None, tgt, cfg, alpha, inplace=inplace)
    terms.total.backward(grad_out)
    return terms, leaf.grad


def _worker(alphas=ALPHAS):
    errors = []
    for i, (cfg, sparse, alpha) in enumerate(cases()):
        if alpha not in alphas:
            continue
        student, teacher, labels, grad_out = _inputs(1000 + i)
        target = _sparse(2000 + i) if sparse else teacher
        total, kd, lm, agree, grad = _unfused(cfg, student, target, labels, alpha)
        terms, fgrad = _fused(cfg, student, target, labels, alpha, grad_out, inplace=i % 2 == 0)
        err = max(
            float((terms.total - total).abs().max()),
            float((terms.kd - kd).abs().max()),
            0.0 if alpha == 1 else float((terms.lm - lm).abs().max()),
            float((fgrad - grad * grad_out.unsqueeze(-1)).abs().max()),
        )
        errors.append((f"{cfg!r} sparse={sparse} alpha={alpha}", err, bool(torch.equal(terms.agree, agree)),
                       float(agree.float().mean())))
    return errors


def _plain_lm_worker():
    """α = 0 without a target: Megatron's vocab_parallel_cross_entropy, in fp32 and float64."""
    out = []
    cfg = KDLossConfig(chunk_tokens=5)
    for dtype in (torch.float32, torch.float64):
        student, _, labels, grad_out = _inputs(7, dtype)
        terms, fgrad = _fused(cfg, student, None, labels, 0.0, grad_out, inplace=True)
        x = vocab_shard(student).clone().requires_grad_(True)
        ce = vocab_parallel_cross_entropy(x * 1.0, labels)  # in place on its input, as in training
        ce.backward(grad_out.to(ce.dtype))
        lm, g_lm = _lm_reference(student.double(), labels)
        out.append((
            str(dtype),
            float((terms.total.double() - ce.double()).abs().max()),
            float((fgrad.double() - x.grad.double()).abs().max()),
            float((terms.total.double() - lm).abs().max()),
            float((fgrad.double() - vocab_shard(g_lm) * grad_out.double().unsqueeze(-1)).abs().max()),
            terms.kd is None and terms.agree is None and torch.equal(terms.total, terms.lm),
        ))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_objective_equals_the_unfused_path(tp):
    # TP=4 (4 ranks on 2 cores): every loss, truncation and τ at one mixed α; the α = 0 and α = 1
    # end points at TP 1 and 2.
    per_rank = run_distributed(_worker, tp, (0.3,) if tp == 4 else ALPHAS, tp=tp)
    agreements = set()
    for rank, errors in enumerate(per_rank):
        for what, err, agree_ok, agree_rate in errors:
            assert err <= TOL, f"rank {rank}: error {err:.3e} for {what}"
            assert agree_ok, f"rank {rank}: top-1 agreement differs for {what}"
            agreements.add(agree_rate)
    assert len(per_rank[0]) > (50 if tp == 4 else 150) and len(agreements) > 1 and max(agreements) > 0.0


@pytest.mark.parametrize("tp", [1, 2])
def test_plain_lm_is_megatron_cross_entropy(tp):
    for rank in run_distributed(_plain_lm_worker, tp, tp=tp):
        for dtype, ce_err, ce_gerr, ref_err, ref_gerr, only_lm in rank:
            assert only_lm
            # Megatron computes in fp32 even for float64 logits: compare at fp32's resolution.
            assert ce_err <= 2e-6 and ce_gerr <= 2e-7, (dtype, ce_err, ce_gerr)
            if dtype == "torch.float64":
                assert ref_err <= TOL and ref_gerr <= TOL, (ref_err, ref_gerr)


def test_blocked_argmax_is_torch_max():
    """The agreement metric's argmax (block maxima first) returns what ``x.max(-1)`` does, ties to
    the first index included; the objective tests above use shards too narrow for blocks."""
    from megadistill.losses.softmax import local_max_argmax

    g = torch.Generator().manual_seed(3)
    for v in (16, 255, 256, 300, 1024, 1100):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = (torch.randn(9, v, generator=g) * 3).to(dtype)
            x[0] = 1.0  # all tied
            x[1, 5] = x[1, v - 1] = 99.0  # first block and last column (the tail when v % 128)
            x[2, v - 1] = 99.0  # the maximum alone in the tail
            x[3, v // 2] = x[3, v // 2 + 1] = 99.0
            x[4, 130 % v] = x[4, 3] = 99.0
            m, i = local_max_argmax(x)
            rm, ri = x.max(-1)
            assert torch.equal(m, rm) and torch.equal(i, ri), (v, dtype)
