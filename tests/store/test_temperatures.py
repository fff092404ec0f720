"""Which temperatures a store is made for: ``store_temperatures`` and the run's KD temperatures
(``KnobSchedule.kd_temperatures``) it defaults to."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megadistill.config import ConfigError, KDConfig, RunConfig, TeacherConfig, TrainingConfig
from megadistill.config.validate import validate
from megadistill.kd.knobs import KnobSchedule
from megadistill.schedules import AlphaSchedule, TemperatureSchedule
from megadistill.store.temperatures import MAX_TEMPERATURES, store_temperatures


def _run(steps=10, **kd) -> RunConfig:
    return RunConfig(teacher=TeacherConfig(mode="offline", store="/nowhere"), kd=KDConfig(**kd),
                     training=TrainingConfig(train_steps=steps))


def _kd_temperatures_by_steps(cfg) -> tuple:
    """The reference: every step's knobs, the τ of those with α > 0."""
    k = KnobSchedule(cfg)
    return tuple(sorted({k.at(s).temperature for s in range(cfg.training.train_steps) if k.at(s).uses_teacher}))


@pytest.mark.parametrize("kd", [
    dict(temperature=2.0),
    dict(temperature=2.0, temperature_schedule=TemperatureSchedule(kind="linear", final=1.0)),
    dict(temperature=4.0, temperature_schedule=TemperatureSchedule(kind="cosine", final=1.0)),
    # SALT: KD for the first 3 steps only, under a τ schedule over the whole run.
    dict(temperature=2.0, temperature_schedule=TemperatureSchedule(kind="linear", final=1.0),
         alpha=AlphaSchedule(kind="salt", alpha_max=0.5, n_kd=3)),
])
def test_kd_temperatures_are_the_taus_of_the_kd_steps(kd):
    cfg = _run(**kd)
    got = KnobSchedule(cfg).kd_temperatures()
    assert got == _kd_temperatures_by_steps(cfg) and len(got) >= 1
    if "alpha" in kd:
        assert len(got) == 3 and max(got) == 2.0
    assert KnobSchedule(replace(cfg, teacher=TeacherConfig())).kd_temperatures() == ()  # no teacher, no KD


def test_top_p_k_stores_serve_one_and_the_run_taus():
    assert store_temperatures("top_p_k", None, (2.0,), "ghost", "x") == (1.0, 2.0)
    assert store_temperatures("top_p_k", None, (1.0,), "ghost", "x") == (1.0,)
    assert store_temperatures("top_p_k", [4, 0.5], (2.0,), "ghost", "x") == (0.5, 1.0, 4.0)  # given wins
    many = tuple(1.0 + i / 100 for i in range(MAX_TEMPERATURES + 5))
    # A schedule with too many values: a renormalised run needs no tails, a ghost run cannot be served.
    assert store_temperatures("top_p_k", None, many, "renormalize", "x") == (1.0,)
    with pytest.raises(ConfigError, match=r"--temperatures: the run's τ schedule .* gives 21 temperatures"):
        store_temperatures("top_p_k", None, many, "ghost", "--temperatures")


def test_rskd_stores_are_drawn_at_one_temperature():
    assert store_temperatures("rskd", None, (2.0,), "renormalize", "x") == (2.0,)
    assert store_temperatures("rskd", None, (), "renormalize", "x") == (1.0,)
    assert store_temperatures("rskd", [0.5], (2.0,), "renormalize", "x") == (0.5,)
    with pytest.raises(ConfigError, match=r"--temperatures: RS-KD draws are made at one temperature, the run's KD"):
        store_temperatures("rskd", None, (1.0, 2.0), "renormalize", "--temperatures")
    with pytest.raises(ConfigError, match=r"^record_logits.temperatures: RS-KD .* record_logits.temperatures take 2"):
        store_temperatures("rskd", [1, 2], (), "renormalize", "record_logits.temperatures")


@pytest.mark.parametrize("bad", [[], [0.0], [-1.0], [float("nan")], [float("inf")], ["2"], [True]])
def test_bad_temperatures_are_refused_naming_the_option(bad):
    with pytest.raises(ConfigError, match=r"^--temperatures: "):
        store_temperatures("top_p_k", bad, (), "ghost", "--temperatures")


def test_record_logits_temperatures_are_validated_with_the_config(tmp_path):
    from megadistill.config import RecordLogitsConfig

    def cfg(**r):
        return RunConfig(output_dir=str(tmp_path), record_logits=RecordLogitsConfig(store=str(tmp_path / "s"), **r))

    validate(cfg(temperatures=[1.0, 2.0]))
    with pytest.raises(ConfigError, match=r"^record_logits.temperatures must be a non-empty list"):
        validate(cfg(temperatures=[0.0]))
    with pytest.raises(ConfigError, match=r"^record_logits.temperatures: RS-KD draws are made at one temperature"):
        validate(cfg(kind="rskd", temperatures=[1.0, 2.0]))
