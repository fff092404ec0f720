"""SALT's two phases in one run: KD from a smaller teacher for ``n_kd`` steps, then plain LM training
with the teacher released (never called again, its tensors freed, stage tensors back to the
student's width), and resume on either side of the switch reproducing the uninterrupted run."""

from __future__ import annotations

import gc
import shutil
import weakref
from dataclasses import replace

import pytest
from tiny_runs import TEACHER, run_metrics, tiny_run

from megadistill.config import (
    CheckpointConfig,
    ConfigError,
    KDConfig,
    ModelConfig,
    ParallelConfig,
    TeacherConfig,
    TrainingConfig,
    to_dict,
    validate,
)
from megadistill.schedules import AlphaSchedule, TemperatureSchedule, kd_ends_at
from megadistill.testing import run_distributed

# SALT's normal case: the teacher is the *smaller* model (fewer layers, narrower, fewer heads).
SMALL_TEACHER = TEACHER  # the architecture of the teacher_run fixture's checkpoint
BIG_STUDENT = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=8)
N_KD, STEPS = 3, 6


def _salt_cfg(out, corpus, teacher_dir, **kw):
    kw.setdefault("training", TrainingConfig(train_steps=STEPS, eval_interval=STEPS, eval_steps=1, log_interval=1))
    return tiny_run(
        out, corpus, model=BIG_STUDENT,
        teacher=TeacherConfig(mode="online", model=SMALL_TEACHER, checkpoint=str(teacher_dir)),
        kd=KDConfig(temperature=2.0, alpha=AlphaSchedule("salt", alpha_max=0.8, n_kd=N_KD),
                    temperature_schedule=TemperatureSchedule("linear", final=1.0)),
        **kw,
    )


def _observed_run(cfg):
    """Run ``cfg``, recording each teacher forward (by step) and the width of what pipeline stage 0
    sends on (by step); return those and whether the teacher's weights outlived the release."""
    from megatron.core import parallel_state

    from megadistill import train
    from megadistill.megatron import online as teacher_mod

    seen = {"teacher_calls": [], "sent_width": {}, "alive_after_release": None}
    step = {"now": 0}
    refs = []
    wrap, release = teacher_mod.OnlineTeacher.wrap, teacher_mod.OnlineTeacher.release

    def observed_wrap(self, student):
        model = wrap(self, student)
        refs.extend(weakref.ref(p) for p in self.teacher.parameters())
        self.teacher.register_forward_hook(lambda *_: seen["teacher_calls"].append(step["now"]) and None)
        if not parallel_state.is_pipeline_last_stage():
            def sent(module, inputs, out):  # returns None: the output goes on unchanged
                seen["sent_width"].setdefault(step["now"], out.shape[-1])

            model.register_forward_hook(sent)
        return model

    def observed_release(self):
        release(self)
        gc.collect()
        seen["alive_after_release"] = sum(r() is not None for r in refs)

    from megadistill.kd.knobs import KnobSchedule

    at = KnobSchedule.at

    def observed_at(self, s):
        step["now"] = s
        return at(self, s)

    teacher_mod.OnlineTeacher.wrap, teacher_mod.OnlineTeacher.release = observed_wrap, observed_release
    KnobSchedule.at = observed_at
    try:
        train.run(cfg, progress=False)
    finally:
        teacher_mod.OnlineTeacher.wrap, teacher_mod.OnlineTeacher.release = wrap, release
        KnobSchedule.at = at
    return seen


def test_schedules_at_key_steps():
    tau = TemperatureSchedule("linear", final=1.0)
    assert [tau(3.0, s, 5) for s in range(5)] == [3.0, 2.5, 2.0, 1.5, 1.0]
    cos = TemperatureSchedule("cosine", final=1.0)
    assert cos(3.0, 0, 101) == 3.0 and cos(3.0, 50, 101) == pytest.approx(2.0) and cos(3.0, 100, 101) == pytest.approx(1.0)
    assert TemperatureSchedule()(2.0, 7, 10) == 2.0
    # Where KD ends for good (the teacher's release step), for every α shape.
    assert kd_ends_at(AlphaSchedule("salt", alpha_max=0.5, n_kd=30), 100) == 30
    assert kd_ends_at(AlphaSchedule("salt", alpha_max=0.5, n_kd=30, transition_steps=9), 100) == 39
    assert kd_ends_at(AlphaSchedule("salt", alpha_max=0.5, n_kd=100), 100) is None
    assert kd_ends_at(AlphaSchedule("salt", alpha_max=0.0, n_kd=30), 100) == 0
    assert kd_ends_at(AlphaSchedule("constant", alpha_max=0.5), 100) is None
    assert kd_ends_at(AlphaSchedule("wsd", alpha_max=0.9, alpha_min=0.0), 100) == 99  # only the last step
    assert kd_ends_at(AlphaSchedule("linear", alpha_start=0.5, alpha_max=0.0), 100) == 99


@pytest.mark.parametrize("schedule, message", [
    (TemperatureSchedule("step", final=1.0), "kd.temperature_schedule.kind: unknown schedule 'step'"),
    (TemperatureSchedule("linear"), "kd.temperature_schedule.final is required for kind linear"),
    (TemperatureSchedule("cosine", final=-1.0), "kd.temperature_schedule.final must be a positive finite number"),
    (TemperatureSchedule("constant", final=2.0), "kd.temperature_schedule.final is set but kind is constant"),
])
def test_invalid_temperature_schedules_name_the_key(schedule, message):
    from megadistill.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        validate(RunConfig(kd=KDConfig(temperature_schedule=schedule)))


@pytest.fixture(scope="module")
def salt_reference(tmp_path_factory, mixed_corpus, teacher_run):
    """The uninterrupted SALT run, checkpointed at steps 2, 4 and 6 (the switch is at step 3)."""
    out = tmp_path_factory.mktemp("salt-full")
    cfg = _salt_cfg(out, mixed_corpus, teacher_run[0] / "checkpoints", checkpoint=CheckpointConfig(save_interval=2))
    seen = run_distributed(_observed_run, 1, cfg)[0]
    return out, cfg, seen


def test_the_teacher_is_never_called_after_the_switch_and_its_tensors_are_freed(salt_reference):
    out, cfg, seen = salt_reference
    micro = cfg.data.global_batch_size // cfg.data.micro_batch_size
    assert seen["teacher_calls"] == [s for s in range(N_KD) for _ in range(micro)]
    assert seen["alive_after_release"] == 0  # nothing kept a reference to a teacher parameter
    m = run_metrics(out)
    assert [m[s]["alpha"] for s in range(1, STEPS + 1)] == [0.8] * N_KD + [0.0] * (STEPS - N_KD)
    assert [m[s]["temperature"] for s in range(1, STEPS + 1)] == pytest.approx([2.0, 1.8, 1.6, 1.4, 1.2, 1.0])
    assert all(m[s]["kd loss"] > 0 for s in range(1, N_KD + 1))
    assert "teacher_time_fraction" in m[N_KD] and "teacher_time_fraction" not in m[N_KD + 1]


@pytest.mark.parametrize("resume_at", [2, 4], ids=["before-the-switch", "after-the-switch"])
def test_resume_on_either_side_of_the_switch_is_exact(tmp_path, mixed_corpus, teacher_run, salt_reference, resume_at):
    full, _, _ = salt_reference
    teacher_dir = teacher_run[0] / "checkpoints"
    if resume_at > N_KD:
        # After the switch no teacher is built: its checkpoint need not exist any more.
        gone = tmp_path / "teacher-deleted"
        shutil.copytree(teacher_dir, gone)
        teacher_dir = gone
    name = f"step_{resume_at:08d}"
    shutil.copytree(full / "checkpoints" / name, tmp_path / "run" / "checkpoints" / name)
    if resume_at > N_KD:
        shutil.rmtree(teacher_dir)
    cfg = _salt_cfg(tmp_path / "run", mixed_corpus, teacher_dir)
    seen = run_distributed(_observed_run, 1, cfg)[0]
    if resume_at > N_KD:
        assert seen["teacher_calls"] == [] and seen["alive_after_release"] is None
    else:
        assert sorted(set(seen["teacher_calls"])) == list(range(resume_at, N_KD))
    a, b = run_metrics(full), run_metrics(tmp_path / "run")
    assert sorted(b) == list(range(resume_at + 1, STEPS + 1))
    for s in b:
        assert ("kd loss" in b[s]) == ("kd loss" in a[s]) == (s <= N_KD), s
        for key in ("total loss", "lm loss", "kd loss", "grad_norm", "temperature"):
            assert b[s].get(key) == a[s].get(key), (s, key)
    assert b[STEPS]["val_loss"] == a[STEPS]["val_loss"]


def test_pipeline_stage_tensors_shrink_to_the_students_width_at_the_switch(tmp_path, mixed_corpus, teacher_run):
    cfg = _salt_cfg(tmp_path / "pp", mixed_corpus, teacher_run[0] / "checkpoints",
                    parallel=ParallelConfig(pipeline_model_parallel_size=2),
                    training=TrainingConfig(train_steps=5, eval_interval=5, eval_steps=1, log_interval=1))
    first, last = run_distributed(_observed_run, 2, cfg, pp=2)
    widths = first["sent_width"]
    assert {s: widths[s] for s in range(N_KD)} == {s: BIG_STUDENT.hidden_size + SMALL_TEACHER.hidden_size for s in range(N_KD)}
    assert {s: widths[s] for s in range(N_KD, 5)} == {s: BIG_STUDENT.hidden_size for s in range(N_KD, 5)}
    assert first["alive_after_release"] == last["alive_after_release"] == 0
    assert max(first["teacher_calls"] + last["teacher_calls"]) == N_KD - 1


def test_a_resume_refuses_another_temperature_schedule():
    # The knob is part of the run: changing τ's schedule is refused on resume like any kd key.
    from megadistill.config import RunConfig
    from megadistill.resume import resume_mismatches

    a = RunConfig(kd=KDConfig(temperature_schedule=TemperatureSchedule("linear", final=1.0)))
    b = replace(a, kd=replace(a.kd, temperature_schedule=TemperatureSchedule("cosine", final=1.0)))
    assert resume_mismatches(b, to_dict(a)) == ["kd.temperature_schedule.kind"]


def test_a_deepspeed_student_releases_its_teacher_too(tmp_path, mixed_corpus, teacher_run):
    from megadistill.config import DeepSpeedConfig, OptimizerConfig

    cfg = _salt_cfg(tmp_path / "ds", mixed_corpus, teacher_run[0] / "checkpoints",
                    optimizer=OptimizerConfig(backend="deepspeed", lr=3e-3, min_lr=3e-4, warmup_fraction=0.1),
                    deepspeed=DeepSpeedConfig(zero_stage=2))
    seen = run_distributed(_observed_run, 1, cfg)[0]
    micro = cfg.data.global_batch_size // cfg.data.micro_batch_size
    assert seen["teacher_calls"] == [s for s in range(N_KD) for _ in range(micro)]
    assert seen["alive_after_release"] == 0
    m = run_metrics(tmp_path / "ds")
    assert "kd loss" in m[N_KD] and "kd loss" not in m[N_KD + 1]
