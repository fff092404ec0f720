"""Every KD loss and its student gradient, on TP = 1, 2, 4 ranks, against the float64 reference."""

from __future__ import annotations


import pytest
import torch

from kd_reference import DIVERGENCES as LOSSES, random_sparse_teacher, reference_dense, reference_sparse, sparse_tails, vocab_shard
from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from megadistill.testing import run_distributed

S, B, V = 3, 4, 64  # 12 tokens; chunk_tokens=5 makes uneven chunks
TOL = 1e-9

PROCESSING = [
    dict(),
    dict(temperature=2.0, scale_by_temperature_squared=True),
    dict(top_p=0.8, top_k=5, truncation="renormalize"),
    dict(top_p=0.8, top_k=5, truncation="ghost", temperature=0.7),
    dict(top_k=3, truncation="ghost"),
    dict(top_p=0.6, truncation="ghost", temperature=1.5),
]


def dense_configs():
    out = []
    for lo in LOSSES:
        for pr in PROCESSING:
            try:
                out.append(KDLossConfig(**lo, **pr, chunk_tokens=5))
            except ValueError:  # reverse KL against a renormalised truncation is rejected by design
                assert lo["loss"] in ("reverse_kl", "jsd") and pr.get("truncation") == "renormalize"
    out.append(KDLossConfig(loss="mse", temperature=2.0, chunk_tokens=5))
    out.append(KDLossConfig(loss="mse", scale_by_temperature_squared=True, temperature=3.0))
    return out


SPARSE_TAIL_TEMPERATURES = (0.5, 2.0)


def sparse_configs():
    out = []
    for lo in LOSSES:
        for pr in (dict(), dict(temperature=2.0), dict(truncation="ghost"), dict(truncation="ghost", temperature=0.5)):
            if (lo["loss"] == "reverse_kl" or lo.get("jsd_beta") == 1.0) and pr.get("truncation") != "ghost":
                continue
            out.append(KDLossConfig(**lo, **pr, chunk_tokens=5))
    return out


def _inputs(seed: int, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(S, B, vocab, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(S, B, vocab, generator=g, dtype=torch.float64) * 3.0
    grad_out = torch.rand(S, B, generator=g, dtype=torch.float64) + 0.5
    return student, teacher, grad_out



def _ours_vs_reference(loss_fn, ref_fn, student, grad_out):
    """(loss error, gradient error) of this rank's shard against the full-vocabulary reference."""
    mine = vocab_shard(student).clone().requires_grad_(True)
    loss = loss_fn(mine)
    loss.backward(grad_out)
    full = student.clone().requires_grad_(True)
    ref = ref_fn(full.reshape(-1, student.shape[-1]))
    (ref * grad_out.reshape(-1)).sum().backward()
    return (
        float((loss.detach().reshape(-1) - ref.detach()).abs().max()),
        float((mine.grad - vocab_shard(full.grad)).abs().max()),
        float(ref.detach().abs().max()),
    )


def _dense_worker(vocab: int = V, configs=None):
    errors = []
    for i, cfg in enumerate(configs or dense_configs()):
        student, teacher, grad_out = _inputs(100 + i, vocab)
        le, ge, scale = _ours_vs_reference(
            lambda s: vocab_parallel_kd_loss(s, vocab_shard(teacher), cfg),
            lambda s: reference_dense(s, teacher.reshape(-1, vocab), cfg),
            student,
            grad_out,
        )
        errors.append((repr(cfg), le, ge, scale))
    return errors


def _sparse_worker():
    errors = []
    for i, cfg in enumerate(sparse_configs()):
        student, _, grad_out = _inputs(300 + i)
        ids, lp, teacher = random_sparse_teacher(500 + i, S, B, 7, V)
        # The truncated ids' tempered mass at several τ, as a store holds it; the loss picks its τ's column.
        tails = sparse_tails(teacher, ids, SPARSE_TAIL_TEMPERATURES)
        tail = tails[..., SPARSE_TAIL_TEMPERATURES.index(cfg.temperature)].exp().reshape(-1) if cfg.temperature != 1.0 else None
        le, ge, scale = _ours_vs_reference(
            lambda s: vocab_parallel_sparse_kd_loss(s, ids, lp, cfg, tails=tails, temperatures=SPARSE_TAIL_TEMPERATURES),
            lambda s: reference_sparse(s, ids.reshape(-1, 7), lp.reshape(-1, 7), cfg, tail=tail),
            student,
            grad_out,
        )
        errors.append((repr(cfg), le, ge, scale))
    return errors


def _assert_small(per_rank):
    for rank, errors in enumerate(per_rank):
        for cfg, le, ge, scale in errors:
            assert le <= TOL * max(1.0, scale), f"rank {rank}: loss error {le:.3e} for {cfg}"
            assert ge <= TOL, f"rank {rank}: gradient error {ge:.3e} for {cfg}"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_dense_losses_match_full_vocab_reference(tp):
    _assert_small(run_distributed(_dense_worker, tp, tp=tp))


@pytest.mark.parametrize("tp", [1, 2])
def test_sparse_losses_match_full_vocab_reference(tp):
    _assert_small(run_distributed(_sparse_worker, tp, tp=tp))


def test_top_p_alone_gathers_enough_candidates_for_a_flat_teacher():
    # A flat teacher over 512 ids needs a nucleus of hundreds of ids: the candidate set must grow
    # past its initial 64 per rank.
    cfgs = [
        KDLossConfig(loss="forward_kl", top_p=0.9, truncation="ghost", chunk_tokens=None),
        KDLossConfig(loss="jsd", top_p=0.95, truncation="renormalize", temperature=2.0),
    ]

    def worker():
        errors = []
        for i, cfg in enumerate(cfgs):
            student, teacher, grad_out = _inputs(700 + i, 512)
            teacher = teacher / 10.0  # flat
            le, ge, scale = _ours_vs_reference(
                lambda s: vocab_parallel_kd_loss(s, vocab_shard(teacher), cfg),
                lambda s: reference_dense(s, teacher.reshape(-1, 512), cfg),
                student,
                grad_out,
            )
            errors.append((repr(cfg), le, ge, scale))
        return errors

    _assert_small(run_distributed(worker, 2, tp=2))
