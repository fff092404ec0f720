"""Identities the KD losses must satisfy, on 2 tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from kd_reference import reference_dense, sparse_tails, vocab_shard
from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from megadistill.losses.targets import DenseTarget, SparseTarget
from megadistill.testing import run_distributed

S, B, V = 4, 3, 32



def _loss_and_grad(fn, student_shard, grad_out):
    x = student_shard.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward(grad_out)
    return loss.detach(), x.grad


def _one_hot_worker():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, B, V, generator=g) * 2
    target = torch.randint(0, V, (S, B), generator=g)
    grad_out = torch.rand(S, B, generator=g) + 0.5
    # Megatron's cross entropy subtracts the max from fp32 logits in place: give it its own copy.
    ce, ce_grad = _loss_and_grad(lambda x: vocab_parallel_cross_entropy(x.clone(), target), vocab_shard(logits), grad_out)
    one_hot = torch.where(torch.nn.functional.one_hot(target, V).bool(), 0.0, -1e4)
    out = {}
    for loss in ("forward_kl", "soft_ce"):
        cfg = KDLossConfig(loss=loss)
        kd, kd_grad = _loss_and_grad(lambda x: vocab_parallel_kd_loss(x, vocab_shard(one_hot), cfg), vocab_shard(logits), grad_out)
        out[f"dense {loss}"] = (float((kd - ce).abs().max()), float((kd_grad - ce_grad).abs().max()))
    for mode in ("renormalize", "ghost"):
        cfg = KDLossConfig(truncation=mode)
        ids, lp = target.unsqueeze(-1), torch.zeros(S, B, 1)
        kd, kd_grad = _loss_and_grad(lambda x: vocab_parallel_sparse_kd_loss(x, ids, lp, cfg), vocab_shard(logits), grad_out)
        out[f"sparse {mode}"] = (float((kd - ce).abs().max()), float((kd_grad - ce_grad).abs().max()))
    out["ce scale"] = (float(ce.abs().max()), 0.0)
    return out


def test_one_hot_teacher_reproduces_megatron_vocab_parallel_cross_entropy():
    for rank, out in enumerate(run_distributed(_one_hot_worker, 2, tp=2)):
        assert out.pop("ce scale")[0] > 1.0  # a non-trivial loss
        for name, (loss_err, grad_err) in out.items():
            assert loss_err < 2e-6, f"rank {rank} {name}: loss differs from Megatron CE by {loss_err}"
            assert grad_err < 1e-6, f"rank {rank} {name}: gradient differs from Megatron CE by {grad_err}"


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(S, B, V, generator=g, dtype=torch.float64) * 3
    grad_out = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    return student, teacher, grad_out


LOSSES = [dict(loss="forward_kl"), dict(loss="soft_ce"), dict(loss="jsd", jsd_beta=0.4), dict(loss="reverse_kl")]


def _equivalences_worker():
    """(name, loss error, grad error) of truncation/sparse forms that must equal the dense loss."""
    rows = []
    for i, lo in enumerate(LOSSES):
        for temperature in (1.0, 2.0):
            student, teacher, grad_out = _inputs(10 * i + int(temperature))
            dense_cfg = KDLossConfig(**lo, temperature=temperature)
            ref, ref_grad = _loss_and_grad(
                lambda x: vocab_parallel_kd_loss(x, vocab_shard(teacher), dense_cfg), vocab_shard(student), grad_out
            )
            for mode in ("renormalize", "ghost"):
                if lo["loss"] == "reverse_kl" and mode == "renormalize":
                    continue
                cfg = KDLossConfig(**lo, temperature=temperature, top_k=V, top_p=1.0, truncation=mode)
                out, grad = _loss_and_grad(lambda x: vocab_parallel_kd_loss(x, vocab_shard(teacher), cfg), vocab_shard(student), grad_out)
                rows.append((f"top-{V} p=1 {mode} {cfg.loss} τ={temperature}", (out - ref).abs().max(), (grad - ref_grad).abs().max()))
                # Every id, in a random order per token, with its τ=1 log-probability.
                order = torch.argsort(torch.rand(S, B, V, generator=torch.Generator().manual_seed(i)), -1)
                lp = torch.log_softmax(teacher, -1).gather(-1, order)
                # Nothing truncated: the tempered tail is empty (-inf), as select_top_p_k stores it.
                tails = torch.full((S, B, 1), float("-inf"), dtype=torch.float64)
                out, grad = _loss_and_grad(
                    lambda x: vocab_parallel_sparse_kd_loss(x, order, lp, cfg, tails=tails, temperatures=(temperature,)),
                    vocab_shard(student), grad_out,
                )
                rows.append((f"sparse all ids {mode} {cfg.loss} τ={temperature}", (out - ref).abs().max(), (grad - ref_grad).abs().max()))
    return [(n, float(a), float(b)) for n, a, b in rows]


def test_full_truncation_and_all_id_sparse_targets_equal_the_dense_loss():
    for rank, rows in enumerate(run_distributed(_equivalences_worker, 2, tp=2)):
        assert len(rows) == 28
        for name, loss_err, grad_err in rows:
            assert loss_err < 1e-12 and grad_err < 1e-12, f"rank {rank} {name}: {loss_err:.2e} {grad_err:.2e}"


def _ghost_mass_worker():
    _, teacher, _ = _inputs(3)
    n = S * B
    sums = []
    for cfg in (
        KDLossConfig(top_p=0.7, top_k=5, truncation="ghost", temperature=1.5),
        KDLossConfig(top_k=2, truncation="ghost", temperature=0.5),
        KDLossConfig(top_p=0.9, truncation="ghost"),
    ):
        group = parallel_state.get_tensor_model_parallel_group()
        t = DenseTarget(vocab_shard(teacher), cfg, group).chunk(0, n, torch.float64)
        kept_mass = t.q.sum(-1)
        dist.all_reduce(kept_mass, group=group)
        ghost = t.logq_ghost.exp()
        # At τ = 1 the ghost holds exactly the truncated ids' softmax mass.
        cfg1 = KDLossConfig(top_p=cfg.top_p, top_k=cfg.top_k, truncation="ghost")
        t1 = DenseTarget(vocab_shard(teacher), cfg1, group).chunk(0, n, torch.float64)
        full = torch.softmax(teacher.reshape(n, V), -1)
        kept_full = torch.zeros(n, V, dtype=torch.bool)
        parts = [torch.empty_like(t1.kept) for _ in range(2)]
        dist.all_gather(parts, t1.kept, group=group)
        kept_full = torch.cat(parts, -1)
        residual = (full * ~kept_full).sum(-1)
        # At cfg's τ it holds the tempered teacher's mass on the same (τ = 1) truncated ids.
        dist.all_gather(parts, t.kept, group=group)
        tempered_tail = (torch.softmax(teacher.reshape(n, V) / cfg.temperature, -1) * ~torch.cat(parts, -1)).sum(-1)
        residual_err = max(float((t1.logq_ghost.exp() - residual).abs().max()), float((ghost - tempered_tail).abs().max()))
        sums.append((float((kept_mass + ghost - 1).abs().max()), float(ghost.min()), residual_err))
        ids = torch.topk(teacher, 4, -1).indices
        lp = torch.log_softmax(teacher, -1).gather(-1, ids)
        tails = sparse_tails(teacher, ids, (cfg.temperature,))
        ts = SparseTarget(ids, lp, cfg, group, V // 2, ids.device, tails=tails, temperatures=(cfg.temperature,)).chunk(0, n, torch.float64)
        kept_mass = ts.q.sum(-1)
        dist.all_reduce(kept_mass, group=group)
        sums.append((float((kept_mass + ts.logq_ghost.exp() - 1).abs().max()), float(ts.logq_ghost.exp().min()), 0.0))
    return sums


def test_ghost_bucket_conserves_probability_mass():
    for rank, sums in enumerate(run_distributed(_ghost_mass_worker, 2, tp=2)):
        for err, ghost_min, residual_err in sums:
            assert err < 1e-12, f"rank {rank}: kept + ghost mass differs from 1 by {err}"
            assert ghost_min > 0, "truncation should leave mass in the ghost bucket"
            assert residual_err < 1e-12


def test_bf16_logits_accumulate_in_fp32():
    student, teacher, grad_out = _inputs(5)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    cfg = KDLossConfig(top_p=0.9, top_k=8, truncation="ghost", temperature=2.0)
    x = s16.clone().requires_grad_(True)
    loss = vocab_parallel_kd_loss(x, t16, cfg, group=None)
    loss.backward(grad_out.float())
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x64 = s16.double().reshape(-1, V).requires_grad_(True)
    ref = reference_dense(x64, t16.double().reshape(-1, V), cfg)
    (ref * grad_out.reshape(-1)).sum().backward()
    assert torch.allclose(loss.double().reshape(-1), ref.detach(), atol=2e-5, rtol=1e-5)
    # The stored gradient is fp32; only the final cast rounds to bf16.
    assert torch.allclose(x.grad.double().reshape(-1, V), x64.grad, atol=4e-3, rtol=1e-2)


def test_chunking_does_not_change_results():
    student, teacher, grad_out = _inputs(6)
    results = []
    for chunk in (None, 1, 5):
        cfg = KDLossConfig(loss="jsd", top_p=0.8, truncation="ghost", chunk_tokens=chunk)
        results.append(_loss_and_grad(lambda x: vocab_parallel_kd_loss(x, teacher, cfg, group=None), student, grad_out))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) or torch.allclose(loss, results[0][0], atol=1e-14, rtol=0)
        assert torch.allclose(grad, results[0][1], atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        KDLossConfig(chunk_tokens=5),
        KDLossConfig(loss="soft_ce", temperature=2.0, top_p=0.8, truncation="ghost", chunk_tokens=5),
        KDLossConfig(loss="reverse_kl", top_k=4, truncation="ghost"),
        KDLossConfig(loss="jsd", jsd_beta=0.3, top_p=0.7, chunk_tokens=4),
        KDLossConfig(loss="mse", temperature=2.0, chunk_tokens=7),
    ],
    ids=lambda c: c.loss,
)
def test_inplace_gradient_equals_out_of_place(cfg):
    student, teacher, grad_out = _inputs(8)
    ref, ref_grad = _loss_and_grad(lambda x: vocab_parallel_kd_loss(x, teacher, cfg, group=None), student, grad_out)
    x = student.clone().requires_grad_(True)
    # A non-leaf, as logits are in a model; the loss may then overwrite its buffer.
    logits = x * 1.0
    loss = vocab_parallel_kd_loss(logits, teacher, cfg, group=None, inplace=True)
    loss.backward(grad_out)
    assert torch.allclose(loss, ref, atol=1e-13, rtol=0)
    assert torch.allclose(x.grad, ref_grad, atol=1e-15, rtol=0)
    assert not torch.equal(logits.detach(), student)  # the buffer now holds the gradient


def test_inplace_refuses_logits_another_loss_still_needs():
    student, teacher, grad_out = _inputs(9)
    logits = student.clone().requires_grad_(True) * 1.0
    other = torch.log_softmax(logits, -1).sum()  # saves its output, not the logits
    entropy_like = (logits * logits).sum()  # saves the logits for backward
    kd = vocab_parallel_kd_loss(logits, teacher, KDLossConfig(), group=None, inplace=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (kd + entropy_like + other).backward()
