"""fp32 numerics of the KD losses where naive formulas break: large logits, confident students and
teachers, masked tokens with undefined losses, top-p over chunks mixing flat and peaked rows."""

from __future__ import annotations

import pytest
import torch

from kd_reference import reference_dense, reference_sparse
from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from megadistill.testing import run_distributed

V = 2048


def _close_pair(seed, offset, n=16, noise=0.05):
    """fp32 student/teacher logits that differ a little, both shifted by ``offset``."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, V, generator=g) * 2 + offset
    student = teacher + torch.randn(n, V, generator=g) * noise
    return student, teacher


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("offset", [0.0, 80.0])
def test_fp32_loss_keeps_precision_for_large_logits(loss, offset):
    student, teacher = _close_pair(1, offset)
    cfg = KDLossConfig(loss=loss)
    ours = vocab_parallel_kd_loss(student, teacher, cfg, group=None).double()
    ref = reference_dense(student.double(), teacher.double(), cfg)
    # The divergences here are ~1e-3; naive fp32 formulas err by ~1e-5 at offset 80.
    assert (ours - ref).abs().max() < 1e-6 * max(1.0, float(ref.abs().max())), (ours - ref).abs().max()


@pytest.mark.parametrize("loss", ["forward_kl", "soft_ce", "jsd", "reverse_kl"])
def test_confident_student_keeps_a_finite_ghost(loss):
    # The student puts ~all its mass on one kept id: its mass on the truncated ids (~e^-100)
    # underflows fp32 in linear space, not in log space.
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(8, V, generator=g)
    student = torch.randn(8, V, generator=g)
    top = teacher.argmax(-1)
    student[torch.arange(8), top] += 100.0
    cfg = KDLossConfig(loss=loss, top_k=4, truncation="ghost")
    x = student.clone().requires_grad_(True)
    ours = vocab_parallel_kd_loss(x, teacher, cfg, group=None)
    ours.sum().backward()
    x64 = student.double().requires_grad_(True)
    ref = reference_dense(x64, teacher.double(), cfg)
    ref.sum().backward()
    assert torch.isfinite(ours).all() and torch.isfinite(x.grad).all()
    assert torch.allclose(ours.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-6)


def test_confident_sparse_teacher_keeps_its_residual():
    # Stored log-probs of a confident teacher: residual mass 1e-9, below fp32's resolution of 1.
    n, k = 6, 3
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    probs = torch.tensor([1 - 2e-9, 5e-10, 5e-10], dtype=torch.float64).expand(n, k)
    lp = probs.log().float()
    student = torch.randn(n, V, generator=g)
    for loss in ("reverse_kl", "forward_kl", "jsd"):
        cfg = KDLossConfig(loss=loss, truncation="ghost")
        ours = vocab_parallel_sparse_kd_loss(student, ids, lp, cfg, group=None)
        ref = reference_sparse(student.double(), ids, lp.double(), cfg)
        assert torch.isfinite(ours).all(), loss
        assert torch.allclose(ours.double(), ref, rtol=1e-5), (loss, ours, ref)


def test_masked_token_with_undefined_loss_gets_zero_gradient():
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(4, V, generator=g)
    student = torch.randn(4, V, generator=g)
    # Token 0: the student has no mass at all outside the teacher's top-2, the teacher has a ghost.
    keep = torch.topk(teacher[0], 2).indices
    row = torch.full((V,), float("-inf"))
    row[keep] = student[0, keep]
    student[0] = row
    cfg = KDLossConfig(top_k=2, truncation="ghost")
    x = student.clone().requires_grad_(True)
    loss = vocab_parallel_kd_loss(x, teacher, cfg, group=None)
    assert not torch.isfinite(loss[0])
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0])
    (loss * mask).nan_to_num(0.0).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0] == 0)
    x64 = student[1:].double().requires_grad_(True)
    reference_dense(x64, teacher[1:].double(), cfg).sum().backward()
    assert torch.allclose(x.grad[1:].double(), x64.grad, atol=1e-6)


def _mixed_top_p_worker():
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(6, 512, generator=g, dtype=torch.float64) * 4
    teacher[2] /= 40.0  # one flat row in a chunk of peaked ones
    student = torch.randn(6, 512, generator=g, dtype=torch.float64)
    r = parallel_state.get_tensor_model_parallel_rank()
    shard = slice(r * 256, (r + 1) * 256)
    cfg = KDLossConfig(top_p=0.9, truncation="ghost")
    x = student[:, shard].clone().requires_grad_(True)
    loss = vocab_parallel_kd_loss(x, teacher[:, shard].contiguous(), cfg)
    loss.sum().backward()
    full = student.clone().requires_grad_(True)
    ref = reference_dense(full, teacher, cfg)
    ref.sum().backward()
    return float((loss - ref).abs().max()), float((x.grad - full.grad[:, shard]).abs().max())


def test_top_p_alone_on_a_chunk_mixing_flat_and_peaked_rows():
    for loss_err, grad_err in run_distributed(_mixed_top_p_worker, 2, tp=2):
        assert loss_err < 1e-12 and grad_err < 1e-12


def test_no_grad_evaluation_and_inplace_on_a_leaf():
    student, teacher = _close_pair(6, 0.0, n=8, noise=1.0)
    cfg = KDLossConfig(chunk_tokens=3)
    ref = vocab_parallel_kd_loss(student.clone().requires_grad_(True), teacher, cfg, group=None)
    with torch.no_grad():
        evaluated = vocab_parallel_kd_loss(student, teacher, cfg, group=None, inplace=True)
    assert torch.equal(evaluated, ref.detach())
    leaf = student.clone().requires_grad_(True)
    vocab_parallel_kd_loss(leaf, teacher, cfg, group=None, inplace=True).sum().backward()
    # A leaf is never overwritten: its .grad would alias its data.
    assert torch.equal(leaf.detach(), student) and leaf.grad.data_ptr() != leaf.data_ptr()
