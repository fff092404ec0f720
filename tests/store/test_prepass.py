"""``teacher.placement: prepass``: the online teacher runs forward-only over each step's
micro-batches before the student, and the student's last stage gets sparse targets.

Whole runs through the training driver (gloo, tiny models): with the same truncation and τ, a
pre-pass run's per-step losses, gradient norms and validation loss equal the co-located online
run's (≤ 1e-6 relative, fp32) at TP = 2 and at PP = 2, through SALT's release of the teacher; RS-KD
pre-pass targets equal a precomputed RS-KD store's; and the refusals.
"""

from __future__ import annotations

import dataclasses

import pytest

from megadistill.config import ConfigError, KDConfig, ParallelConfig, TeacherConfig, TeacherLayout, validate
from megadistill.schedules import AlphaSchedule
from megadistill.testing import run_distributed
from tiny_runs import TEACHER, run_metrics, run_precompute, run_training, tiny_run

STEPS = 4


def _run(out, corpus, corpus_teacher_ckpt, kd, placement: str = "colocated", **teacher):
    return tiny_run(out, corpus, steps=STEPS, kd=kd, teacher=TeacherConfig(
        mode="online", model=TEACHER, checkpoint=corpus_teacher_ckpt, placement=placement, **teacher))


def _same(ref: dict, got: dict, what: str) -> None:
    """Per-step total and LM losses and the validation loss within 1e-6 (relative); the KD loss
    within 1e-6 absolute and gradient norms within 2e-6 relative. The co-located path evaluates
    the tempered target densely in fp32, the pre-pass in float64 from the selected ids (as a
    store's): here KD values are ~3e-3, a near-zero KL whose fp32 evaluation rounds at ~1e-5 of it,
    and Adam carries that into the next steps' gradients at the 1e-6 level."""
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1)), what
    for step in ref:
        tolerances = {"total loss": 1e-6, "lm loss": 1e-6, "grad_norm": 2e-6, "kd loss": None}
        if step == STEPS:
            tolerances["val_loss"] = 1e-6
        for k, rel in tolerances.items():
            if k not in ref[step]:
                assert k not in got[step], f"{what} step {step}: {k} only in the pre-pass run"
                continue
            want, have = ref[step][k], got[step][k]
            bound = 1e-6 if rel is None else rel * abs(want)
            assert abs(have - want) <= bound, f"{what} step {step} {k}: {have} vs {want}"


def _layout(cfg, **parallel):
    return dataclasses.replace(cfg, parallel=ParallelConfig(**parallel))


def _train(cfg, world: int = 2):
    """``run_training(cfg)`` in ``world`` forked ranks laid out as ``cfg.parallel`` says."""
    p = cfg.parallel
    return run_distributed(run_training, world, cfg, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size)


# SALT: KD for 3 steps (α 0.6), then plain LM training with the teacher released.
GHOST = KDConfig(top_p=0.9, top_k=12, truncation="ghost", temperature=2.0,
                 alpha=AlphaSchedule("salt", alpha_max=0.6, n_kd=3))


@pytest.mark.parametrize("parallel", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_prepass_equals_colocated(tmp_path, corpus, corpus_teacher_ckpt, parallel):
    metrics = {}
    for placement in ("colocated", "prepass"):
        out = tmp_path / placement
        cfg = _layout(_run(out, corpus, corpus_teacher_ckpt, GHOST, placement=placement), **parallel)
        _train(cfg)
        metrics[placement] = run_metrics(out)
    ref, got = metrics["colocated"], metrics["prepass"]
    assert all("kd loss" in ref[s] for s in (1, 2, 3)) and "kd loss" not in ref[STEPS]
    _same(ref, got, f"prepass vs colocated {parallel}")
    # The teacher's time is counted while it runs, and not after its release.
    assert got[1]["teacher_time_fraction"] > 0 and got[STEPS].get("teacher_time_fraction", 0.0) == 0.0


@pytest.mark.parametrize("student, teacher", [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["tp2-teacher-pp2", "pp2-teacher-tp2"])
def test_a_teacher_in_its_own_layout_equals_one_in_the_students(tmp_path, corpus, corpus_teacher_ckpt, student, teacher):
    """teacher.parallel: on the same 2 ranks, a student at TP 2 with a teacher at PP 2 (and the
    reverse) trains as with the teacher in the student's layout: its targets, made on its own last
    stage, reach every rank of the student's last stage."""
    layout = dict(tensor_model_parallel_size=student[0], pipeline_model_parallel_size=student[1])
    metrics = {}
    for own in (False, True):
        out = tmp_path / f"own-{own}"
        extra = {"parallel": TeacherLayout(*teacher)} if own else {}
        _train(_layout(_run(out, corpus, corpus_teacher_ckpt, GHOST, placement="prepass", **extra), **layout))
        metrics[own] = run_metrics(out)
    _same(metrics[False], metrics[True], f"student TP x PP {student}, teacher {teacher}")


def test_a_teacher_in_its_own_layout_serves_other_replicas(tmp_path, corpus, corpus_teacher_ckpt, capfd):
    """4 ranks, student TP 2 x DP 2 (replicas {0, 1} and {2, 3}), teacher PP 2 x DP 2 (replicas
    {0, 2} and {1, 3}): each teacher replica runs every other micro-batch of the global batch, so
    targets cross between the layouts' replicas; the run equals the same-layout one."""
    layout = dict(tensor_model_parallel_size=2)
    metrics = {}
    for own in (False, True):
        out = tmp_path / f"own-{own}"
        extra = {"parallel": TeacherLayout(1, 2)} if own else {}
        cfg = _layout(_run(out, corpus, corpus_teacher_ckpt, GHOST, placement="prepass", **extra), **layout)
        run_distributed(run_training, 4, cfg, tp=2)
        metrics[own] = run_metrics(out)
    assert "teacher online (pre-pass, TP 1 x PP 2)" in capfd.readouterr().out
    _same(metrics[False], metrics[True], "student TP 2 x DP 2, teacher PP 2 x DP 2")


def test_prepass_equals_colocated_with_deepspeed(tmp_path, corpus, corpus_teacher_ckpt):
    """The DeepSpeed backend (ZeRO-1, DP = 2) calls the pre-pass too."""
    metrics = {}
    for placement in ("colocated", "prepass"):
        out = tmp_path / placement
        cfg = _run(out, corpus, corpus_teacher_ckpt, GHOST, placement=placement)
        _train(dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, backend="deepspeed")))
        metrics[placement] = run_metrics(out)
    _same(metrics["colocated"], metrics["prepass"], "prepass vs colocated, DeepSpeed ZeRO-1 DP=2")


def test_prepass_rskd_equals_a_precomputed_rskd_store(tmp_path, corpus, corpus_teacher_ckpt):
    """RS-KD draws made in the pre-pass are the ones ``precompute-logits --kind rskd`` stores (the
    same uniforms: a hash of the seed, the global sample index and the position)."""
    kd = KDConfig(truncation="ghost", temperature=2.0, alpha=AlphaSchedule("constant", alpha_max=0.5))
    store = TeacherConfig(mode="offline", model=TEACHER, checkpoint=corpus_teacher_ckpt, store=str(tmp_path / "store"))
    run_distributed(run_precompute, 1, tiny_run(tmp_path / "pre", corpus, steps=STEPS, kd=kd, teacher=store),
                    kind="rskd", draws=8)
    _train(_layout(tiny_run(tmp_path / "offline", corpus, steps=STEPS, kd=kd, teacher=store), pipeline_model_parallel_size=2))
    prepass = _layout(_run(tmp_path / "prepass", corpus, corpus_teacher_ckpt, kd, placement="prepass",
                           prepass_targets="rskd", prepass_draws=8), pipeline_model_parallel_size=2)
    _train(prepass)
    _same(run_metrics(tmp_path / "offline"), run_metrics(tmp_path / "prepass"), "RS-KD prepass vs store (PP=2)")


def test_prepass_refusals(tmp_path, corpus):
    def cfg(kd=KDConfig(top_k=8), **teacher):
        t = dict(mode="online", model=TEACHER, checkpoint="/nowhere", placement="prepass") | teacher
        return tiny_run(tmp_path, corpus, kd=kd, teacher=TeacherConfig(**t))

    validate(cfg())
    validate(cfg(kd=KDConfig(), prepass_targets="rskd"))
    with pytest.raises(ConfigError, match="needs truncated targets.*placement colocated"):
        validate(cfg(kd=KDConfig()))
    with pytest.raises(ConfigError, match="kd.loss mse"):
        validate(cfg(kd=KDConfig(loss="mse"), prepass_targets="rskd"))
    with pytest.raises(ConfigError, match="reverse KL is infinite against them when renormalised"):
        validate(cfg(kd=KDConfig(loss="reverse_kl"), prepass_targets="rskd"))
    with pytest.raises(ConfigError, match="teacher.placement prepass is for teacher.mode=online"):
        validate(cfg(mode="offline", store="/nowhere"))
    with pytest.raises(ConfigError, match="prepass_draws must be a positive integer"):
        validate(cfg(prepass_targets="rskd", prepass_draws=0))
    with pytest.raises(ConfigError, match="teacher.placement: 'elsewhere' is not one of"):
        validate(cfg(placement="elsewhere"))
    # teacher.parallel: its own layout (TP x PP need not be the student's).
    validate(cfg(parallel=TeacherLayout(1, 2)), world_size=2)
    with pytest.raises(ConfigError, match="only a pre-pass teacher has a layout of its own"):
        validate(cfg(placement="colocated", parallel=TeacherLayout(2, 1)))
    with pytest.raises(ConfigError, match="world size 2 is not divisible by the teacher's TP x PP = 1 x 4"):
        validate(cfg(model=dataclasses.replace(TEACHER, num_layers=4), parallel=TeacherLayout(1, 4)), world_size=2)
    with pytest.raises(ConfigError, match="teacher.model.num_layers 2 is not divisible by teacher.parallel.pipeline_model_parallel_size 4"):
        validate(cfg(parallel=TeacherLayout(1, 4)))
    with pytest.raises(ConfigError, match="teacher's 4 data-parallel replicas cannot share a step's 2 micro-batches"):
        validate(_layout(cfg(parallel=TeacherLayout(1, 1)), tensor_model_parallel_size=2), world_size=4)
    with pytest.raises(ConfigError, match="teacher.parallel.tensor_model_parallel_size must be a positive integer"):
        validate(cfg(parallel=TeacherLayout(0, 1)))
