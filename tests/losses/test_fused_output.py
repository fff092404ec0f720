"""The fused output layer + objective (``fused_output_distillation``) against the unfused path and
the full-vocabulary reference.

Unfused = the logits ``hidden @ weight_shard.T`` on each rank, ``vocab_parallel_distillation_loss``
on them, ``(total · weights).sum().backward()``, with ``hidden`` passed through megatron-core's
``copy_to_tensor_model_parallel_region`` in both paths (the all-reduce of ∂/∂hidden over TP).
Reference = float64 autograd through the full-vocabulary logits and the textbook losses of
kd_reference.py, in one process. In float64 they agree (loss, per-token terms, agreement,
∂/∂hidden, ∂/∂weight) for every loss, truncation, dense online teacher and sparse (top-K, RS-KD)
targets, τ ∈ {1, 2}, α ∈ {0, 0.5, 1} at TP = 1, 2 and 4 (4 ranks on 2 cores); chunks of 5 tokens
(uneven) in every other case at TP 1 and 2, one chunk at TP 4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from kd_reference import DENSE_TRUNCATIONS, LOSSES, SPARSE_TRUNCATIONS, kept_mask, random_sparse_teacher, reference_dense, reference_sparse, sparse_tails, stored_mask
from megadistill.kd.teacher import SparseLogits
from megadistill.losses import KDLossConfig, fused_output_distillation, vocab_parallel_distillation_loss
from megadistill.testing import run_distributed

N, H, HT, V, K = 12, 8, 10, 64, 7
TOL = 1e-11  # against the unfused path (same kernels, different matmul order)
REF_TOL = 1e-9  # against the reference (as test_kd_losses)

ALPHAS = [0.0, 0.5, 1.0]
TAUS = [1.0, 2.0]


def cases():
    """``(cfg, kind, alpha)``, kind one of "online" (teacher hidden + weight), "sparse", "rskd",
    "none" (plain LM, α = 0)."""
    out = []
    for kind, truncs in (("online", DENSE_TRUNCATIONS), ("sparse", SPARSE_TRUNCATIONS)):
        for lo in LOSSES:
            for tr in truncs:
                for tau in TAUS:
                    if lo["loss"] == "mse" and (kind == "sparse" or tr):
                        continue
                    try:
                        cfg = KDLossConfig(**lo, **tr, temperature=tau, scale_by_temperature_squared=tau != 1.0,
                                           chunk_tokens=5 if len(out) % 2 else None)
                    except ValueError:  # reverse KL against a renormalised teacher is rejected by design
                        continue
                    if kind == "sparse" and cfg.is_reverse_kl and cfg.truncation == "renormalize":
                        continue
                    out.extend((cfg, kind, alpha) for alpha in ALPHAS)
    for tau in TAUS:
        out.extend((KDLossConfig(truncation="ghost", temperature=tau, chunk_tokens=5), "rskd", a) for a in ALPHAS)
    out.append((KDLossConfig(chunk_tokens=5), "none", 0.0))
    return out


def _inputs(seed: int):
    """Full-vocabulary student and online-teacher layers, labels and reduction weights."""
    g = torch.Generator().manual_seed(seed)
    d = dict(generator=g, dtype=torch.float64)
    hidden = torch.randn(N, H, **d)
    weight = torch.randn(V, H, **d) * 0.8
    # The teacher extends the student's features, so that top-1 agreement is neither 0 nor 1.
    t_hidden = torch.cat([hidden, torch.randn(N, HT - H, **d)], -1)
    t_weight = torch.cat([weight + 0.5 * torch.randn(V, H, **d), torch.randn(V, HT - H, **d)], -1)
    labels = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, **d) + 0.5
    weights[[2, 7]] = 0.0  # masked tokens
    return hidden, weight, t_hidden, t_weight, labels, weights


def _sparse(seed: int, kind: str, tau: float) -> SparseLogits:
    """Top-K sparse targets as test_fused_objective builds them (a stored residual slightly off
    1 - Σ p, the tempered tails at τ = 2), or RS-KD draws made at ``tau``."""
    ids, lp, teacher = random_sparse_teacher(seed, 1, N, K, V)
    ids, lp, teacher = ids[0], lp[0], teacher[0]
    if kind == "rskd":
        # An empirical distribution of draws: the stored ids only, summing to 1, used as is at τ.
        lp = torch.log_softmax(lp.masked_fill(ids < 0, float("-inf")), -1).masked_fill(ids < 0, 0.0)
        return SparseLogits(ids, lp, drawn_at=tau)
    residual = (1.0 - lp.exp().masked_fill(ids < 0, 0.0).sum(-1)) * 0.999
    temperatures = tuple(t for t in TAUS if t != 1.0)
    return SparseLogits(ids, lp, residual, sparse_tails(teacher, ids, temperatures), temperatures)


def _shard_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows ``[v/tp, ...]`` of a full-vocabulary ``[V, ...]`` weight."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    w = x.shape[0] // tp
    return x[r * w : (r + 1) * w]


def _unfused(cfg, kind, alpha, inputs, sparse):
    hidden, weight, t_hidden, t_weight, labels, weights = inputs
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logits = copy_to_tensor_model_parallel_region(h) @ _shard_rows(w).t()
    target = (t_hidden @ _shard_rows(t_weight).t()) if kind == "online" else sparse
    terms = vocab_parallel_distillation_loss(logits, labels if alpha < 1 else None, target, cfg, alpha)
    loss = (terms.total * weights).sum()
    loss.backward()
    return loss.detach(), terms, h.grad, _shard_rows(w.grad)


def _fused(cfg, kind, alpha, inputs, sparse):
    hidden, weight, t_hidden, t_weight, labels, weights = inputs
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    online = dict(teacher_hidden=t_hidden, teacher_weight=_shard_rows(t_weight)) if kind == "online" else {}
    terms = fused_output_distillation(
        copy_to_tensor_model_parallel_region(h), _shard_rows(w), labels if alpha < 1 else None, weights, alpha, cfg,
        target=sparse, **online,
    )
    terms.loss.backward()
    return terms, h.grad, _shard_rows(w.grad)


def _reference(cfg, kind, alpha, inputs, sparse):
    """Loss, per-token total and ∂loss/∂(hidden, weight) through the full-vocabulary logits."""
    hidden, weight, t_hidden, t_weight, labels, weights = inputs
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    z = h @ w.t()
    lm = torch.logsumexp(z, -1) - z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    teacher = t_hidden @ t_weight.t()
    zs = z
    if cfg.truncation == "renormalize_both" and kind != "none":
        # The student too is renormalised over the teacher's kept ids: its logits elsewhere are -inf.
        kept = kept_mask(teacher, cfg) if kind == "online" else stored_mask(sparse.ids, V)
        zs = z.masked_fill(~kept, float("-inf"))
    if kind == "online":
        kd = reference_dense(zs, teacher, cfg)
    elif kind in ("sparse", "rskd"):
        tail = None
        if kind == "sparse" and cfg.truncation == "ghost":
            tail = sparse.residual if cfg.temperature == 1.0 else sparse.tails[:, 0].exp()
        kd = reference_sparse(zs, sparse.ids, sparse.logprobs, cfg, tail=tail, drawn=kind == "rskd")
    else:
        kd = torch.zeros_like(lm)
    total = alpha * kd + (1 - alpha) * lm
    loss = (total * weights).sum()
    loss.backward()
    return loss.detach(), total.detach(), h.grad, _shard_rows(w.grad)


def _err(a, b) -> float:
    return float((a - b).detach().abs().max())


def _worker():
    rows = []
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for i, (cfg, kind, alpha) in enumerate(cases()):
        if tp == 4:
            # 4 ranks share 2 cores: one chunk per case (chunks of 5 tokens run at TP 1 and 2), so
            # that its collectives, not the arithmetic, do not dominate the suite's time.
            cfg = dataclasses.replace(cfg, chunk_tokens=None)
        inputs = _inputs(100 + i)
        sparse = _sparse(200 + i, kind, cfg.temperature) if kind in ("sparse", "rskd") else None
        u_loss, u, u_gh, u_gw = _unfused(cfg, kind, alpha, inputs, sparse)
        f, f_gh, f_gw = _fused(cfg, kind, alpha, inputs, sparse)
        errs = [_err(f.loss, u_loss), _err(f.total, u.total), _err(f_gh, u_gh), _err(f_gw, u_gw)]
        if u.kd is not None:
            errs.append(_err(f.kd, u.kd))
        if u.lm is not None:
            errs.append(_err(f.lm, u.lm))
        agree_ok = (f.agree is None) == (u.agree is None) and (f.agree is None or torch.equal(f.agree, u.agree))
        r_loss, r_total, r_gh, r_gw = _reference(cfg, kind, alpha, inputs, sparse)
        ref = max(_err(f.loss, r_loss), _err(f.total, r_total), _err(f_gh, r_gh), _err(f_gw, r_gw))
        rate = None if f.agree is None else float(f.agree.double().mean())
        rows.append((f"{cfg!r} {kind} alpha={alpha}", max(errs), ref, agree_ok, rate))
    return rows


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_output_equals_unfused_and_reference(tp):
    per_rank = run_distributed(_worker, tp, tp=tp)
    rates = set()
    for rank, rows in enumerate(per_rank):
        for what, err, ref, agree_ok, rate in rows:
            assert err <= TOL, f"rank {rank}: error {err:.3e} against the unfused path for {what}"
            assert ref <= REF_TOL, f"rank {rank}: error {ref:.3e} against the reference for {what}"
            assert agree_ok, f"rank {rank}: top-1 agreement differs for {what}"
            rates.add(rate)
    assert len(per_rank[0]) > 120
    assert len(rates - {None}) > 1


def test_tied_embedding_gradient_accumulates():
    """A tied output layer passes the embedding's own weight: its gradient sums both uses, as the
    unfused path's does (single process, one chunk of 5 tokens and an uneven rest)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (N,), generator=g)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g, dtype=torch.float64)
    cfg = KDLossConfig(temperature=2.0, chunk_tokens=5)
    base = torch.randn(V, H, generator=g, dtype=torch.float64)

    def grads(fused: bool):
        emb = base.clone().requires_grad_(True)
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, emb) @ mix)
        if fused:
            loss = fused_output_distillation(hidden, emb, labels, weights, 0.5, cfg, None, target=teacher).loss
        else:
            terms = vocab_parallel_distillation_loss(hidden @ emb.t(), labels, teacher, cfg, 0.5, group=None)
            loss = (terms.total * weights).sum()
        loss.backward()
        return loss.detach(), emb.grad

    (fl, fg), (ul, ug) = grads(True), grads(False)
    assert _err(fl, ul) <= TOL and _err(fg, ug) <= TOL
    # Both uses contribute: rows of ids that are no input token still get the output layer's gradient.
    unused = torch.ones(V, dtype=torch.bool)
    unused[tokens] = False
    assert bool((fg[unused].abs().sum(-1) > 0).all()) and bool((fg[tokens].abs().sum() > 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_follow_the_unfused_path(dtype):
    """fp32 / bf16 inputs: gradients in the inputs' dtype, close to the unfused path computed from
    the same-dtype logits (the objective runs in fp32 in both)."""
    hidden, weight, t_hidden, t_weight, labels, weights = _inputs(9)
    cfg = KDLossConfig(top_p=0.9, truncation="ghost", chunk_tokens=5)
    out = []
    for fused in (True, False):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        th, tw = t_hidden.to(dtype), t_weight.to(dtype)
        if fused:
            terms = fused_output_distillation(h, w, labels, weights, 0.5, cfg, None,
                                              teacher_hidden=th, teacher_weight=tw)
            loss = terms.loss
        else:
            terms = vocab_parallel_distillation_loss(h @ w.t(), labels, th @ tw.t(), cfg, 0.5, group=None)
            loss = (terms.total * weights.float()).sum()
        loss.backward()
        assert h.grad.dtype == dtype and w.grad.dtype == dtype
        out.append((loss.detach().double(), h.grad.double(), w.grad.double()))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(*out):
        assert _err(a, b) <= tol * max(1.0, float(b.abs().max()))


def test_corrupt_online_teacher_raises():
    """check_finite: a non-finite online-teacher logit raises, naming the token."""
    hidden, weight, t_hidden, t_weight, labels, weights = _inputs(3)
    t_hidden[9, 0] = float("nan")
    with pytest.raises(ValueError, match="online teacher logits contain NaN or Inf.*token 9"):
        fused_output_distillation(hidden, weight, labels, weights, 0.5, KDLossConfig(chunk_tokens=5), None,
                                  teacher_hidden=t_hidden, teacher_weight=t_weight)
