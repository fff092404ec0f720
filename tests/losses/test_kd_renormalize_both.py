"""``truncation='renormalize_both'`` (NVIDIA ModelOpt's top-K convention) against its formula.

Both distributions are restricted to the teacher's kept ids and renormalised there:
``P'_i = exp(z_i/τ) / Σ_{j kept} exp(z_j/τ)``, ``Q'_i = p_i^(1/τ) / Σ_{j kept} p_j^(1/τ)`` (p the
teacher's τ = 1 probabilities), and the divergence is taken between P' and Q' on the kept ids alone;
the truncated ids get no gradient. The reference below computes that in float64 with autograd,
on the full vocabulary, independently of the kept-set code under test except for the kept ids.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from kd_reference import kept_mask
from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from megadistill.testing import run_distributed

S, B, V, K = 3, 4, 64, 7
TOL = 1e-10


def _divergence(P: torch.Tensor, Q: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    """The textbook formula on one token's kept ids (both distributions sum to 1 there)."""
    kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731 (every kept id has mass > 0)
    if cfg.loss == "forward_kl" or (cfg.loss == "jsd" and cfg.jsd_beta == 0.0):
        return kl(Q, P)
    if cfg.loss == "soft_ce":
        return -(Q * P.log()).sum()
    if cfg.is_reverse_kl:
        return kl(P, Q)
    b = cfg.jsd_beta
    M = b * Q + (1 - b) * P
    return b * kl(Q, M) + (1 - b) * kl(P, M)


def _reference(student: torch.Tensor, p1: torch.Tensor, kept: torch.Tensor, cfg: KDLossConfig) -> torch.Tensor:
    """Per-token loss ``[n]`` of ``student[n, V]`` against τ = 1 teacher probabilities ``p1[n, V]``."""
    scale = cfg.temperature**2 if cfg.scale_by_temperature_squared else 1.0
    out = []
    for i in range(student.shape[0]):
        k = kept[i]
        P = torch.softmax(student[i][k] / cfg.temperature, -1)
        w = p1[i][k] ** (1.0 / cfg.temperature)
        out.append(_divergence(P, w / w.sum(), cfg) * scale)
    return torch.stack(out)


CONFIGS = [
    dict(loss="forward_kl"),
    dict(loss="soft_ce", temperature=2.0),
    dict(loss="reverse_kl"),  # finite here, unlike against a teacher renormalised alone
    dict(loss="jsd", jsd_beta=0.3, temperature=1.5, scale_by_temperature_squared=True),
    dict(loss="jsd", jsd_beta=1.0, temperature=0.7),
]


def _worker():
    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    shard = lambda x: x[..., r * V // tp : (r + 1) * V // tp]  # noqa: E731
    errors = []
    for i, kw in enumerate(CONFIGS):
        g = torch.Generator().manual_seed(40 + i)
        student = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 2.0
        teacher = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 3.0
        grad_out = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
        # A student whose own maximum is truncated away, far above the kept ids (its softmax over
        # them must not underflow).
        student[0, 0] = -800.0
        student[0, 0, teacher[0, 0].argmin()] = 60.0
        flat_t = teacher.reshape(-1, V)

        # Dense: top-p-then-top-k truncation of the teacher.
        cfg = KDLossConfig(**kw, top_p=0.8, top_k=5, truncation="renormalize_both", chunk_tokens=5)
        kept = kept_mask(flat_t, cfg)
        # Sparse: stored top-K ids with padding, the same convention.
        scfg = KDLossConfig(**kw, truncation="renormalize_both", chunk_tokens=5)
        logp = torch.log_softmax(flat_t, -1)
        top = torch.topk(logp, K, dim=-1)
        ids, lp = top.indices.clone(), top.values.clone()
        ids[::3, -1], lp[::3, -1] = -1, 0.0
        rows, slots = (ids >= 0).nonzero(as_tuple=True)
        skept = torch.zeros_like(kept)
        skept[rows, ids[rows, slots]] = True
        for name, fn, ref_kept, c in (
            ("dense", lambda s: vocab_parallel_kd_loss(s, shard(teacher), cfg), kept, cfg),
            ("sparse", lambda s: vocab_parallel_sparse_kd_loss(s, ids.view(S, B, K), lp.view(S, B, K), scfg),
             skept, scfg),
        ):
            mine = shard(student).clone().requires_grad_(True)
            loss = fn(mine)
            loss.backward(grad_out)
            full = student.clone().requires_grad_(True)
            ref = _reference(full.reshape(-1, V), torch.softmax(flat_t, -1), ref_kept, c)
            (ref * grad_out.reshape(-1)).sum().backward()
            off_kept = shard(~ref_kept.view(S, B, V))
            errors.append((
                f"{name} {kw}",
                float((loss.detach().reshape(-1) - ref.detach()).abs().max()),
                float((mine.grad - shard(full.grad)).abs().max()),
                float(mine.grad[off_kept].abs().max()) if bool(off_kept.any()) else 0.0,
                bool(torch.isfinite(loss).all()),
            ))
    return errors


@pytest.mark.parametrize("tp", [1, 2])
def test_renormalize_both_matches_its_formula(tp):
    for rank, errors in enumerate(run_distributed(_worker, tp, tp=tp)):
        for what, le, ge, off, finite in errors:
            assert finite, f"rank {rank}: non-finite loss for {what}"
            assert le <= TOL and ge <= TOL, f"rank {rank}: {what}: loss error {le:.3e}, gradient error {ge:.3e}"
            assert off == 0.0, f"rank {rank}: {what}: gradient {off:.3e} on a truncated id"


def test_renormalize_both_differs_from_the_student_full_softmax():
    """The two conventions are different losses (so the option is not a silent alias)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, V, generator=g, dtype=torch.float64), torch.randn(2, 3, V, generator=g, dtype=torch.float64) * 3
    a = vocab_parallel_kd_loss(s, t, KDLossConfig(top_k=5, truncation="renormalize"), group=None)
    b = vocab_parallel_kd_loss(s, t, KDLossConfig(top_k=5, truncation="renormalize_both"), group=None)
    assert bool((a - b > 1e-3).all())  # renormalising the student on the kept ids lowers forward KL
