"""Bad inputs to the KD losses raise errors that say what is wrong."""

from __future__ import annotations

import pytest
import torch

from megadistill.kd.teacher import SparseLogits
from megadistill.losses import (
    KDLoss,
    KDLossConfig,
    check_vocab_partition,
    vocab_parallel_distillation_loss,
    vocab_parallel_kd_loss,
    vocab_parallel_sparse_kd_loss,
)
from megadistill.testing import run_distributed


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_teacher_student_shard_mismatch():
    with pytest.raises(ValueError, match=r"teacher logits shard \(2, 3, 6\) does not match student logits shard \(2, 3, 8\)"):
        vocab_parallel_kd_loss(_logits(2, 3, 8), _logits(2, 3, 6), KDLossConfig(), group=None)


def test_vocab_not_divisible_by_tp():
    with pytest.raises(ValueError, match="vocab size 1001 is not divisible by tensor-parallel size 2"):
        check_vocab_partition(1001, 2)
    assert check_vocab_partition(1024, 4) == 256


@pytest.mark.parametrize("bad_id", [8, 100, -2])
def test_sparse_ids_out_of_range(bad_id):
    ids = torch.tensor([[[0, 1]], [[2, bad_id]]])
    lp = torch.log(torch.full((2, 1, 2), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"out of range \[0, 8\).*id {bad_id} at token 1, slot 1"):
        vocab_parallel_sparse_kd_loss(_logits(2, 1, 8), ids, lp, KDLossConfig(), group=None)


def test_sparse_duplicate_ids_and_excess_mass():
    lp = torch.log(torch.full((1, 1, 2), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="ids repeat within token 0"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), torch.tensor([[[3, 3]]]), lp, KDLossConfig(), group=None)
    lp = torch.log(torch.tensor([[[0.7, 0.6]]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sum to 1.300000 > 1 at token 0"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), torch.tensor([[[3, 4]]]), lp, KDLossConfig(), group=None)
    with pytest.raises(ValueError, match="finite log-probabilities"):
        vocab_parallel_sparse_kd_loss(
            _logits(1, 1, 8), torch.tensor([[[3, 4]]]), torch.tensor([[[float("nan"), -1.0]]]), KDLossConfig(), group=None
        )
    with pytest.raises(ValueError, match=r"ids \(1, 1, 2\) and logprobs \(1, 1, 3\) differ"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), torch.tensor([[[3, 4]]]), torch.zeros(1, 1, 3), KDLossConfig(), group=None)
    with pytest.raises(ValueError, match=r"cover tokens \(2, 1\) but student logits are \(1, 1, 8\)"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), torch.zeros(2, 1, 2, dtype=torch.long), torch.zeros(2, 1, 2), KDLossConfig(), group=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_teacher_logits(bad):
    teacher = _logits(2, 2, 8)
    teacher[1, 0, 5] = bad
    with pytest.raises(ValueError, match=r"teacher logits contain NaN or Inf on tensor-parallel rank\(s\) \[0\]; on this rank first at token 2, vocab id 5"):
        vocab_parallel_kd_loss(_logits(2, 2, 8, seed=1), teacher, KDLossConfig(), group=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=-1.0), "temperature must be > 0, got -1.0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(jsd_beta=1.5), r"jsd_beta must be in \[0, 1\], got 1.5"),
        (dict(jsd_beta=-0.1), r"jsd_beta must be in \[0, 1\], got -0.1"),
        (dict(loss="kld"), "unknown loss 'kld'"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(truncation="drop"), "unknown mode 'drop'"),
        (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
        (dict(loss="mse", top_k=50), "'mse' compares logits and cannot use top_p/top_k"),
        (dict(loss="reverse_kl", top_p=0.9), "reverse KL, infinite against a renormalised truncated teacher"),
        (dict(loss="jsd", jsd_beta=1.0, top_k=5), "reverse KL, infinite"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDLossConfig(**kwargs)


def test_sparse_targets_reject_mse_and_renormalised_reverse_kl():
    ids, lp = torch.tensor([[[1]]]), torch.zeros(1, 1, 1)
    with pytest.raises(ValueError, match="mse"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), ids, lp, KDLossConfig(loss="mse"), group=None)
    with pytest.raises(ValueError, match="use truncation='ghost'"):
        vocab_parallel_sparse_kd_loss(_logits(1, 1, 8), ids, lp, KDLossConfig(loss="reverse_kl"), group=None)


def test_sparse_ghost_at_a_temperature_without_its_tail_is_refused():
    # The tempered mass of the truncated ids cannot be derived from the kept ones: a ghost bucket at
    # τ ≠ 1 needs the store's column for that τ, and approximating it (r^(1/τ)) is what issue 21 removed.
    ids, lp = torch.tensor([[[1, 4]]]), torch.log(torch.tensor([[[0.5, 0.2]]], dtype=torch.float64))
    s = _logits(1, 1, 8)
    ghost2 = KDLossConfig(truncation="ghost", temperature=2.0)
    with pytest.raises(ValueError, match=r"ghost bucket at temperature 2 .* hold only at temperature\(s\) 1;"):
        vocab_parallel_sparse_kd_loss(s, ids, lp, ghost2, group=None)
    tails = torch.full((1, 1, 2), -1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ghost bucket at temperature 2 .* temperature\(s\) 1, 0.5, 4;"):
        vocab_parallel_sparse_kd_loss(s, ids, lp, ghost2, group=None, tails=tails, temperatures=(0.5, 4.0))
    # The trainer's path (SparseLogits through the fused objective) refuses it the same way.
    with pytest.raises(ValueError, match=r"ghost bucket at temperature 2 .* temperature\(s\) 1, 0.5, 4;"):
        vocab_parallel_distillation_loss(s, None, SparseLogits(ids, lp, None, tails, (0.5, 4.0)), ghost2, 1.0, group=None)
    with pytest.raises(ValueError, match=r"sparse tails \(1, 1, 2\) .* must be \(1, 1, 1\)"):
        vocab_parallel_sparse_kd_loss(s, ids, lp, ghost2, group=None, tails=tails, temperatures=(2.0,))
    # With the column, or renormalised (exact at any τ from the kept ids alone), it is served.
    assert torch.isfinite(vocab_parallel_sparse_kd_loss(s, ids, lp, ghost2, group=None, tails=tails, temperatures=(0.5, 2.0))).all()
    assert torch.isfinite(vocab_parallel_sparse_kd_loss(s, ids, lp, KDLossConfig(temperature=2.0), group=None)).all()


def test_rskd_targets_are_refused_at_another_temperature():
    # RS-KD counts estimate the teacher at the temperature they were drawn at, and only there.
    ids, lp = torch.tensor([[[1, 4]]]), torch.log(torch.tensor([[[0.75, 0.25]]], dtype=torch.float64))
    s = _logits(1, 1, 8)
    for cfg in (KDLossConfig(truncation="ghost"), KDLossConfig(truncation="renormalize", temperature=0.5)):
        with pytest.raises(ValueError, match=rf"drawn at temperature 2 \(RS-KD\).*the loss's temperature is {cfg.temperature:g}"):
            vocab_parallel_sparse_kd_loss(s, ids, lp, cfg, group=None, drawn_at=2.0)
        with pytest.raises(ValueError, match=r"drawn at temperature 2 \(RS-KD\)"):
            vocab_parallel_distillation_loss(s, None, SparseLogits(ids, lp, drawn_at=2.0), cfg, 1.0, group=None)
    assert torch.isfinite(vocab_parallel_sparse_kd_loss(s, ids, lp, KDLossConfig(truncation="ghost", temperature=2.0),
                                                        group=None, drawn_at=2.0)).all()


def test_nll_alias_and_module_form():
    cfg = KDLossConfig(loss="nll")
    assert cfg.loss == "soft_ce"
    s, t = _logits(2, 2, 8), _logits(2, 2, 8, seed=3)
    assert torch.equal(KDLoss(cfg, group=None)(s, t), vocab_parallel_kd_loss(s, t, cfg, group=None))


def test_second_backward_is_refused():
    x = _logits(2, 2, 8).requires_grad_(True)
    loss = vocab_parallel_kd_loss(x, _logits(2, 2, 8, seed=2), KDLossConfig(), group=None).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


def _nan_on_rank_1_worker():
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    teacher = _logits(4, 2, 8)
    if rank == 1:
        teacher[3, 1, 2] = float("nan")
    try:
        vocab_parallel_kd_loss(_logits(4, 2, 8, seed=1), teacher, KDLossConfig(chunk_tokens=3))
    except ValueError as e:
        return str(e)
    return "no error"


def test_corrupt_teacher_shard_raises_on_every_rank():
    # Only rank 1 holds the NaN; rank 0 must raise too rather than wait in the next collective.
    msgs = run_distributed(_nan_on_rank_1_worker, 2, tp=2)
    assert msgs[0] == "teacher logits contain NaN or Inf on tensor-parallel rank(s) [1]"
    assert msgs[1] == "teacher logits contain NaN or Inf on tensor-parallel rank(s) [1]; on this rank first at token 7, vocab id 10"
