"""Half-precision students and teachers through the training driver (``megadistill.train.run``) on
CPU/gloo: bf16 at TP=2 and PP=2 tracks the fp32 run, a bf16 resume is exact, fp16 trains with
dynamic loss scaling (skipping overflowing steps), and the DeepSpeed backend trains in bf16.

Tolerance (measured here, 8 steps of a 2-layer hidden-64 student, KD from a 2-layer hidden-96
teacher, α = 0.5): bf16's per-step total, LM and KD losses stay within ``LOSS_TOL`` = 0.01 of
fp32's (the largest gap seen was 0.0008 at PP=2, about 1e-4 relative). The fp32 main weights keep
the updates exact; what differs is the bf16 forward (8 mantissa bits), and the gap grows with the
steps: this bounds a short run only.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import pytest
import torch
from tiny_runs import STUDENT, online_kd_run, run_metrics, tiny_run

from megadistill.config import (
    CheckpointConfig,
    ConfigError,
    DeepSpeedConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    validate,
)
from megadistill.testing import run_distributed

STEPS = 8
LOSS_TOL = 0.01


def _training(steps=STEPS, **kw):
    return TrainingConfig(train_steps=steps, eval_interval=steps, eval_steps=1, log_interval=1, **kw)


def _precision_cfg(out, corpus, teacher_dir, student: str | None, teacher: str | None, **kw):
    kw.setdefault("training", _training())
    cfg = online_kd_run(out, corpus, teacher_dir, **kw)
    return replace(cfg, model=replace(cfg.model, precision=student),
                   teacher=replace(cfg.teacher, model=replace(cfg.teacher.model, precision=teacher)))


def _observed_run(cfg):
    """Train ``cfg``; return the dtypes the first step saw: the student's weights, the teacher's,
    the optimizer's main parameters, and the student's logits as the loss received them."""
    from megadistill import train
    from megadistill.megatron.backend import MegatronBackend
    from megadistill.megatron.loss import DistillationLoss

    seen = {}
    step, loss_call = MegatronBackend.train_step, DistillationLoss.__call__

    def observed_step(self, micro_batches, knobs):
        if "student" not in seen:
            seen["student"] = {p.dtype for p in self.model.parameters()}  # DDP holds the student alone
            teacher = getattr(getattr(self.teacher, "model", None), "teacher", None)
            seen["teacher"] = {p.dtype for p in teacher.parameters()} if teacher is not None else None
            seen["main"] = {p.dtype for g in self.optimizer.param_groups for p in g["params"]}
        return step(self, micro_batches, knobs)

    def observed_loss(self, labels, loss_mask, target, student_logits):
        seen.setdefault("logits", (student_logits.dtype, None if target is None else target.dtype))
        return loss_call(self, labels, loss_mask, target, student_logits)

    MegatronBackend.train_step, DistillationLoss.__call__ = observed_step, observed_loss
    try:
        train.run(cfg, progress=False)
    finally:
        MegatronBackend.train_step, DistillationLoss.__call__ = step, loss_call
    return seen


@pytest.fixture(scope="module")
def fp32_references(tmp_path_factory, mixed_corpus, teacher_run):
    """The fp32 runs the bf16 ones are compared with, at TP=2 and at PP=2."""
    out = {}
    for layout, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        d = tmp_path_factory.mktemp(f"fp32-{layout}")
        cfg = _precision_cfg(d, mixed_corpus, teacher_run[0] / "checkpoints", "fp32", "fp32",
                             parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        run_distributed(_observed_run, 2, cfg, tp=tp, pp=pp)
        out[layout] = run_metrics(d)
    return out


@pytest.mark.parametrize(
    "layout, teacher",
    [("tp2", "bf16"),  # student bf16 + teacher bf16
     ("pp2", "bf16"),
     ("pp2", None)],  # teacher at its CPU default (fp32): its fp32 hidden states ride in the bf16 stage tensor
)
def test_bf16_trains_at_tp2_and_pp2_and_tracks_fp32(tmp_path, mixed_corpus, teacher_run, fp32_references, layout, teacher):
    tp, pp = (2, 1) if layout == "tp2" else (1, 2)
    cfg = _precision_cfg(tmp_path / "run", mixed_corpus, teacher_run[0] / "checkpoints", "bf16", teacher,
                         parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    validate(cfg, world_size=2)
    seen = run_distributed(_observed_run, 2, cfg, tp=tp, pp=pp)
    teacher_dtype = torch.bfloat16 if teacher == "bf16" else torch.float32
    for rank in seen:
        assert rank["student"] == {torch.bfloat16}
        assert rank["teacher"] == {teacher_dtype}
        assert rank["main"] == {torch.float32}  # fp32 main parameters in Megatron's optimizer
    last = seen[-1]  # the last stage computes the loss
    assert last["logits"] == (torch.bfloat16, teacher_dtype)
    ref, got = fp32_references[layout], run_metrics(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        for key in ("total loss", "lm loss", "kd loss"):
            assert abs(got[s][key] - ref[s][key]) < LOSS_TOL, (s, key, got[s][key], ref[s][key])
        assert got[s]["total loss"] != ref[s]["total loss"]  # it did run in bf16
    gap = max(abs(got[s][k] - ref[s][k]) for s in got for k in ("total loss", "lm loss", "kd loss"))
    print(f"bf16 {layout} teacher {teacher}: largest loss gap to fp32 {gap:.4f}")
    assert got[STEPS]["total loss"] < got[1]["total loss"] - 0.2
    assert abs(got[STEPS]["val_loss"] - ref[STEPS]["val_loss"]) < LOSS_TOL


def test_a_bf16_resume_is_exact(tmp_path, mixed_corpus, teacher_run):
    steps = 6
    full = tmp_path / "full"
    kw = dict(training=_training(steps), checkpoint=CheckpointConfig(save_interval=3),
              parallel=ParallelConfig(tensor_model_parallel_size=2))
    run_distributed(_observed_run, 2, _precision_cfg(full, mixed_corpus, teacher_run[0] / "checkpoints", "bf16", "bf16", **kw), tp=2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    run_distributed(_observed_run, 2, _precision_cfg(resumed, mixed_corpus, teacher_run[0] / "checkpoints", "bf16", "bf16", **kw), tp=2)
    a, b = run_metrics(full), run_metrics(resumed)
    assert sorted(b) == [4, 5, 6]
    for s in b:
        for key in ("total loss", "lm loss", "kd loss", "grad_norm"):
            assert b[s][key] == a[s][key], (s, key)
    assert b[steps]["val_loss"] == a[steps]["val_loss"]


def test_fp16_with_dynamic_loss_scaling_skips_overflows_then_trains(tmp_path, mixed_corpus):
    # The loss is a token *sum* (calculate_per_token_loss): a scale of 2**13 makes fp16 gradients
    # overflow; the scaler halves it at every overflow (hysteresis 1) until steps apply.
    opt = OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_fraction=0.1, initial_loss_scale=2.0**13, hysteresis=1)
    cfg = tiny_run(tmp_path / "fp16", mixed_corpus, model=replace(STUDENT, precision="fp16"), optimizer=opt,
                   training=_training(10))
    seen = run_distributed(_observed_run, 1, cfg)[0]
    assert seen["student"] == {torch.float16} and seen["main"] == {torch.float32}
    m = run_metrics(tmp_path / "fp16")
    skipped = [s for s in m if "grad_norm" not in m[s]]
    applied = [s for s in m if "grad_norm" in m[s]]
    assert skipped and skipped == list(range(1, len(skipped) + 1)), skipped  # the first steps overflow
    assert len(applied) >= 5, applied
    # A skipped step leaves the weights and the LR schedule where they were.
    assert m[skipped[-1] + 1]["lr"] == m[1]["lr"]
    assert m[10]["total loss"] < m[applied[0]]["total loss"] - 0.1


def test_an_fp16_resume_restores_the_loss_scale(tmp_path, mixed_corpus):
    # Steps 1-3 overflow and halve the scale (2**13 -> 2**10); a resume at step 3 that restarted
    # from optimizer.initial_loss_scale would skip steps 4-6 again instead of applying them.
    opt = OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_fraction=0.1, initial_loss_scale=2.0**13, hysteresis=1)
    kw = dict(model=replace(STUDENT, precision="fp16"), optimizer=opt, training=_training(6),
              checkpoint=CheckpointConfig(save_interval=3))
    run_distributed(_observed_run, 1, tiny_run(tmp_path / "full", mixed_corpus, **kw))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", tmp_path / "resumed" / "checkpoints" / "step_00000003")
    run_distributed(_observed_run, 1, tiny_run(tmp_path / "resumed", mixed_corpus, **kw))
    a, b = run_metrics(tmp_path / "full"), run_metrics(tmp_path / "resumed")
    assert "grad_norm" not in a[3] and all("grad_norm" in a[s] for s in (4, 5, 6))
    for s in (4, 5, 6):
        for key in ("total loss", "grad_norm", "lr"):
            assert b[s][key] == a[s][key], (s, key)


def test_deepspeed_trains_a_bf16_student_from_a_bf16_teacher(tmp_path, mixed_corpus, teacher_run):
    from megadistill import train

    cfg = _precision_cfg(tmp_path / "ds", mixed_corpus, teacher_run[0] / "checkpoints", "bf16", "bf16",
                         optimizer=OptimizerConfig(backend="deepspeed", lr=3e-3, min_lr=3e-4, warmup_fraction=0.1),
                         deepspeed=DeepSpeedConfig(zero_stage=1))
    validate(cfg, world_size=1)

    def observed(cfg):
        from megadistill.deepspeed.backend import DeepSpeedBackend

        seen = {}
        init = DeepSpeedBackend.__init__

        def observed_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            seen["student"] = {p.dtype for p in self.student.parameters()}
            seen["bf16"] = self.engine.bfloat16_enabled()

        DeepSpeedBackend.__init__ = observed_init
        try:
            train.run(cfg, progress=False)
        finally:
            DeepSpeedBackend.__init__ = init
        return seen

    seen = run_distributed(observed, 1, cfg)[0]
    assert seen == {"student": {torch.bfloat16}, "bf16": True}
    m = run_metrics(tmp_path / "ds")
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["total loss"] < m[1]["total loss"] - 0.2
    assert all("grad_norm" in m[s] for s in m)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"precision": "fp8"}}, "model.precision: 'fp8' is not one of (None, 'fp32', 'bf16', 'fp16')"),
        ({"teacher": {"mode": "online", "checkpoint": "x", "model": {"precision": "half"}}},
         "teacher.model.precision: 'half' is not one of"),
        ({"optimizer": {"initial_loss_scale": 0.0}}, "optimizer.initial_loss_scale must be > 0"),
        ({"optimizer": {"min_loss_scale": 1024.0, "initial_loss_scale": 2.0}}, "optimizer.min_loss_scale 1024.0 exceeds"),
        ({"model": {"precision": "fp16"}, "optimizer": {"backend": "deepspeed", "initial_loss_scale": 1000.0}},
         "optimizer.initial_loss_scale 1000.0 must be a power of two"),
        ({"model": {"precision": "bf16"}, "optimizer": {"backend": "deepspeed"}, "deepspeed": {"config": {"fp16": {"enabled": True}}}},
         "deepspeed.config.fp16.enabled=True contradicts model.precision='bf16'"),
    ],
)
def test_invalid_precision_settings_name_the_key(overrides, message):
    from megadistill.config import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict(overrides)
    assert message in str(e.value)


def test_deepspeed_config_follows_model_precision():
    from megadistill.config import DataConfig, RunConfig
    from megadistill.config.deepspeed import deepspeed_config

    base = RunConfig(optimizer=OptimizerConfig(backend="deepspeed"), data=DataConfig(micro_batch_size=4, global_batch_size=16))
    got = deepspeed_config(replace(base, model=ModelConfig(precision="bf16")), 2)
    assert got["bf16"] == {"enabled": True} and got["fp16"] == {"enabled": False}
    assert got["data_types"] == {"grad_accum_dtype": "fp32"}
    got = deepspeed_config(replace(base, model=ModelConfig(precision="fp16"),
                                   optimizer=replace(base.optimizer, initial_loss_scale=1024.0, hysteresis=3)), 2)
    assert got["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 1000,
                           "hysteresis": 3, "min_loss_scale": 1.0}
    got = deepspeed_config(replace(base, model=ModelConfig(precision="fp16"), optimizer=replace(base.optimizer, loss_scale=128.0)), 2)
    assert got["fp16"] == {"enabled": True, "loss_scale": 128.0}


def _loss_in_both_dtypes(target_kind: str):
    """The fused objective of the same bf16-representable logits given as bf16 and as fp32."""
    from megadistill.kd.teacher import SparseLogits
    from megadistill.losses import KDLossConfig, vocab_parallel_distillation_loss

    g = torch.Generator().manual_seed(5)
    s, b, v, k = 16, 2, 256, 8
    student = (3 * torch.randn(s, b, v, generator=g)).bfloat16()
    labels = torch.randint(0, v, (s, b), generator=g)
    if target_kind == "dense":
        teacher = (3 * torch.randn(s, b, v, generator=g)).bfloat16()
        targets = (teacher, teacher.float())
    else:  # an offline store's sparse top-k, log-probs stored in fp16 as the store does
        ids = torch.randperm(v, generator=g)[:k].expand(s, b, k).contiguous()
        lp = torch.log_softmax(torch.randn(s, b, k, generator=g), -1) - 0.1
        # The ghost bucket at τ = 2 is the truncated ids' tempered mass, stored per token: here as if
        # the residual 1 - e^-0.1 were spread evenly over the v - k truncated ids.
        tails = torch.full((s, b, 1), math.log((v - k) * ((1 - math.exp(-0.1)) / (v - k)) ** 0.5))
        sparse = SparseLogits(ids, lp.half(), None, tails, (2.0,))
        targets = (sparse, sparse)
    out = []
    for x, t in zip((student, student.float()), targets):
        leaf = x.clone().requires_grad_(True)
        cfg = KDLossConfig(temperature=2.0, top_p=0.95, top_k=20, truncation="ghost")
        terms = vocab_parallel_distillation_loss(leaf * 1, labels, t, cfg, 0.5, group=None, inplace=True)
        terms.total.sum().backward()
        out.append((terms.total, terms.kd, terms.lm, leaf.grad))
    return out


@pytest.mark.parametrize("target_kind", ["dense", "sparse"])
def test_the_kd_loss_reads_half_precision_logits_in_fp32(target_kind):
    # A bf16 output layer's logits (student and teacher) give the fp32 losses of the same values:
    # the loss upcasts chunk by chunk instead of computing in bf16.
    (half, full) = run_distributed(_loss_in_both_dtypes, 1, target_kind)[0]
    for a, b in zip(half[:3], full[:3], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert half[3].dtype == torch.bfloat16  # the gradient goes back to the bf16 output layer
    torch.testing.assert_close(half[3].float(), full[3].bfloat16().float(), rtol=0, atol=1e-2)
