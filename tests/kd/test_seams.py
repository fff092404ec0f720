"""The driver's seams: samplers and sample-indexed batches, dense and sparse KD targets through the
Megatron loss, one route for α and τ (a step carries both), and teacher sources."""

from __future__ import annotations

import pytest
import torch
from kd_reference import reference_sparse, sparse_tails
from megatron.core import parallel_state

from megadistill.kd.teacher import InModelTargets, NoTeacher, SparseLogits
from megadistill.config import RunConfig
from megadistill.losses import KDLossConfig
from megadistill.megatron.loss import DistillationLoss
from megadistill.kd.knobs import KDStep
from megadistill.sampler import ContiguousSampler, micro_batches
from megadistill.testing import run_distributed


def test_contiguous_sampler_partitions_each_global_batch():
    s = ContiguousSampler(global_batch_size=12, dp_size=3)
    for step in range(4):
        parts = [list(s.indices(step, r)) for r in range(3)]
        assert sorted(sum(parts, [])) == list(range(12 * step, 12 * (step + 1)))
        assert all(len(p) == 4 for p in parts)
    assert list(s.indices(2, 1)) == [28, 29, 30, 31]  # a function of (step, rank) alone: no iterator state
    with pytest.raises(ValueError, match="not divisible by DP size"):
        ContiguousSampler(10, 3)


def test_micro_batches_carry_their_sample_indices():
    dataset = {i: {k: torch.full((5,), i) for k in ("tokens", "labels", "loss_mask", "position_ids")} for i in range(40)}
    batches = micro_batches(dataset, range(8, 14), 2, torch.device("cpu"))
    assert [b["indices"].tolist() for b in batches] == [[8, 9], [10, 11], [12, 13]]
    for b in batches:
        assert torch.equal(b["tokens"][:, 0], b["indices"])
    with pytest.raises(ValueError, match="do not split into micro-batches of 4"):
        micro_batches(dataset, range(6), 4, torch.device("cpu"))


def test_teacher_sources_split_model_outputs():
    logits, teacher_logits = torch.zeros(1), torch.ones(1)
    assert NoTeacher().split({}, logits) == (logits, None)
    assert InModelTargets().split({}, (logits, teacher_logits)) == (logits, teacher_logits)
    assert InModelTargets().split({}, logits) == (logits, None)


def _kd_value(config_tau: float, step: KDStep) -> float:
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    loss = DistillationLoss(KDLossConfig(temperature=config_tau), step)
    total, _, _ = loss(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), teacher, student.requires_grad_(True))
    return float(total.detach())


def _temperature_routes():
    return (
        _kd_value(1.0, KDStep(alpha=1.0, temperature=2.0)),  # the config says 1, the step 2
        _kd_value(2.0, KDStep(alpha=1.0, temperature=2.0)),
        _kd_value(2.0, KDStep(alpha=1.0, temperature=1.0)),  # the config says 2, the step 1
    )


def test_the_loss_takes_temperature_from_the_step_alone():
    # KDLossConfig.temperature is the schedule's starting value (KnobSchedule reads kd.temperature);
    # the loss never falls back to it or lets it override the step's τ.
    config_1_step_2, config_2_step_2, config_2_step_1 = run_distributed(_temperature_routes, 1)[0]
    assert config_1_step_2 == config_2_step_2 and config_2_step_2 != config_2_step_1


@pytest.mark.parametrize("kwargs, missing", [
    (dict(alpha=0.5), "'temperature'"), (dict(temperature=2.0), "'alpha'"), ({}, "'alpha' and 'temperature'"),
], ids=["no-tau", "no-alpha", "neither"])
def test_a_step_without_alpha_or_temperature_is_refused(kwargs, missing):
    # No default α (it was 0.5) and no τ deferring to the loss's configured one.
    with pytest.raises(TypeError, match=rf"missing \d required positional arguments?: {missing}$"):
        KDStep(**kwargs)


@pytest.mark.parametrize("alpha, tau, message", [
    (0.5, None, "temperature must be a finite number > 0, got None"),
    (0.5, 0.0, "temperature must be a finite number > 0, got 0.0"),
    (0.5, float("inf"), "temperature must be a finite number > 0, got inf"),
    (0.5, float("nan"), "temperature must be a finite number > 0, got nan"),
    (None, 1.0, r"KD weight alpha must be a number in \[0, 1\], got None"),
    (1.5, 1.0, r"KD weight alpha must be a number in \[0, 1\], got 1.5"),
])
def test_a_step_with_an_invalid_knob_is_refused(alpha, tau, message):
    with pytest.raises(ValueError, match=message):
        KDStep(alpha=alpha, temperature=tau)


def test_a_loss_without_a_step_is_an_error_not_a_default_alpha():
    loss = DistillationLoss(KDLossConfig())
    logits = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match=r"DistillationLoss has no step: set loss.step = KDStep\(alpha=..., temperature=...\)"):
        loss(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), logits, logits.clone())


def test_knob_schedule_is_the_route_from_config_to_the_loss():
    from megadistill.config import KDConfig, TeacherConfig, TrainingConfig
    from megadistill.kd.knobs import KnobSchedule
    from megadistill.schedules import AlphaSchedule

    cfg = RunConfig(
        teacher=TeacherConfig(mode="online", checkpoint="t"),
        kd=KDConfig(temperature=2.0, alpha=AlphaSchedule("salt", alpha_max=0.9, n_kd=5)),
        training=TrainingConfig(train_steps=10),
    )
    assert [KnobSchedule(cfg).at(s) for s in (0, 7)] == [KDStep(0.9, 2.0), KDStep(0.0, 2.0)]
    plain = RunConfig(kd=cfg.kd, training=cfg.training)  # no teacher: α is 0 whatever the schedule
    assert KnobSchedule(plain).at(0) == KDStep(0.0, 2.0)


V, K = 64, 6


def _sparse_loss_worker(alpha: float):
    """Megatron loss with sparse targets at this TP size: total, reports and full-vocab gradient."""
    torch.manual_seed(3)
    tp, r = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    ids[1, 2, -2:] = -1  # padded slots
    labels = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[0, 4] = 0
    cfg = KDLossConfig(truncation="ghost", temperature=1.5)
    loss = DistillationLoss(cfg, KDStep(alpha=alpha, temperature=cfg.temperature))
    shard = student[..., r * V // tp : (r + 1) * V // tp].clone().requires_grad_(True)
    # A ghost bucket at τ = 1.5 needs the truncated ids' tempered mass, as a store made for 1.5 holds it.
    tails = sparse_tails(teacher, ids, (cfg.temperature,))
    total, n, report = loss(labels, mask, SparseLogits(ids, logprobs, None, tails, (cfg.temperature,)), shard * 1.0)
    total.backward()
    grads = [torch.empty_like(shard.grad) for _ in range(tp)]
    torch.distributed.all_gather(grads, shard.grad.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return float(total), int(n), {k: v.tolist() for k, v in report.items()}, torch.cat(grads, -1)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_megatron_loss_takes_sparse_targets(tp, alpha):
    """(1-α)·CE + α·KD against stored (id, log-prob) targets equals a float64 full-vocabulary
    reference in value and gradient at TP=1 and 2. (Megatron's cross entropy computes in fp32
    whatever the logits' dtype, so with an LM term the tolerance is fp32's.)"""
    tol = 1e-10 if alpha == 1.0 else 1e-6
    total, n, report, grad = run_distributed(_sparse_loss_worker, tp, alpha, tp=tp)[0]
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    ids[1, 2, -2:] = -1
    labels = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    mask[0, 4] = 0
    cfg = KDLossConfig(truncation="ghost", temperature=1.5)
    s = student.reshape(-1, V).clone().requires_grad_(True)
    tail = sparse_tails(teacher, ids, (cfg.temperature,)).exp().reshape(-1)
    kd = reference_sparse(s, ids.reshape(-1, K), logprobs.reshape(-1, K), cfg, tail=tail)
    ce = torch.nn.functional.cross_entropy(s, labels.reshape(-1), reduction="none")
    m = mask.reshape(-1).double()
    ref = ((1 - alpha) * ce * m + alpha * kd * m).sum()
    ref_value = float(ref.detach())
    ref.backward()
    assert n == 9
    assert total == pytest.approx(ref_value, rel=tol)
    assert torch.allclose(grad.reshape(-1, V), s.grad, atol=tol)
    assert report["kd loss"][0] == pytest.approx(float((kd * m).sum().detach()), rel=1e-10)
    if alpha < 1.0:
        assert report["lm loss"][0] == pytest.approx(float((ce * m).sum().detach()), rel=1e-6)
    teacher_top1 = ids.reshape(-1, K)[:, 0]  # top-k ids come sorted by log-prob
    agree = ((s.detach().argmax(-1) == teacher_top1).double() * m).sum()
    assert report["top1 agreement"] == [float(agree), 9.0]
