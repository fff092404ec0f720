"""Conventions shared with peer libraries, checked against their formulas written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses import KDLossConfig, vocab_parallel_kd_loss
from megadistill.testing import run_distributed

BETAS = (0.1, 0.25, 0.5, 0.75, 0.9)


def _gkd_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalized JSD per token, computed the way TRL's ``generalized_jsd_loss`` does:
    ``β·KL(p_t ‖ M) + (1-β)·KL(p_s ‖ M)``, ``M = β·p_t + (1-β)·p_s``, from log-probabilities."""
    ls, lt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    lm = torch.logsumexp(torch.stack([ls + torch.log(torch.tensor(1 - beta, dtype=ls.dtype)),
                                      lt + torch.log(torch.tensor(beta, dtype=ls.dtype))]), 0)
    kl_t = F.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def _inputs(vocab=48):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(5, 2, vocab, generator=g, dtype=torch.float64) * 2,
            torch.randn(5, 2, vocab, generator=g, dtype=torch.float64) * 3)


def _ours(beta: float, group=None):
    from megatron.core import parallel_state

    student, teacher = _inputs()
    tp = parallel_state.get_tensor_model_parallel_world_size() if group is not None else 1
    r = parallel_state.get_tensor_model_parallel_rank() if group is not None else 0
    w = student.shape[-1] // tp
    mine = student[..., r * w:(r + 1) * w].clone().requires_grad_(True)
    loss = vocab_parallel_kd_loss(mine, teacher[..., r * w:(r + 1) * w], KDLossConfig(loss="jsd", jsd_beta=beta),
                                  group=group)
    loss.sum().backward()
    return loss.detach(), mine.grad


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_is_gkds_generalized_jsd(beta):
    student, teacher = _inputs()
    want = _gkd_jsd(student.requires_grad_(True), teacher, beta)
    want.sum().backward()
    got, grad = _ours(beta)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, student.grad, rtol=0, atol=1e-12)


def _ours_tp(beta):
    from megatron.core import parallel_state

    return _ours(beta, parallel_state.get_tensor_model_parallel_group())


def test_jsd_at_tp2_equals_the_formula():
    student, teacher = _inputs()
    for beta in (0.1, 0.9):
        student.grad = None
        want = _gkd_jsd(student.requires_grad_(True), teacher, beta)
        want.sum().backward()
        for rank, (got, grad) in enumerate(run_distributed(_ours_tp, 2, beta, tp=2)):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(grad, student.grad[..., rank * 24:(rank + 1) * 24], rtol=0, atol=1e-12)


def test_jsd_limits_are_forward_and_reverse_kl_as_trl_special_cases_them():
    student, teacher = _inputs()
    ls, lt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(teacher ‖ student)
    reverse = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(student ‖ teacher)
    torch.testing.assert_close(_ours(0.0)[0], forward, rtol=0, atol=1e-12)
    torch.testing.assert_close(_ours(1.0)[0], reverse, rtol=0, atol=1e-12)


def _default_group_without_parallel_state():
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # torch.distributed stays up, Megatron's groups do not
    student, teacher = _inputs()
    try:
        vocab_parallel_kd_loss(student[..., :24], teacher[..., :24], KDLossConfig())
    except ValueError as e:
        message = str(e)
    else:
        message = None
    explicit = vocab_parallel_kd_loss(student, teacher, KDLossConfig(), group=None)  # whole vocabulary: fine
    return dist.get_world_size(), message, float(explicit.sum())


def test_the_default_group_is_never_silently_tp1_across_ranks():
    for world, message, explicit in run_distributed(_default_group_without_parallel_state, 2):
        assert world == 2 and explicit > 0
        assert message is not None and "group='default' needs Megatron's parallel_state" in message
        assert "pass group=<the process group sharing the vocabulary>, or group=None" in message
