"""α schedules: the PD paper's constant/linear/cosine/periodic/WSD shapes and SALT's two phases."""

import pytest

from megadistill.schedules import AlphaSchedule


def values(s: AlphaSchedule, total: int = 100):
    return [s(i, total) for i in range(total)]


def test_constant_linear_cosine():
    assert set(values(AlphaSchedule("constant", alpha_max=0.7))) == {0.7}
    lin = values(AlphaSchedule("linear", alpha_start=0.9, alpha_max=0.1))
    assert lin[0] == pytest.approx(0.9) and lin[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lin, lin[1:]))
    cos = values(AlphaSchedule("cosine", alpha_max=0.8, alpha_min=0.2))
    assert cos[0] == pytest.approx(0.8) and cos[-1] == pytest.approx(0.2) and cos[50] == pytest.approx(0.5, abs=0.02)


def test_wsd_warms_up_holds_and_decays():
    s = AlphaSchedule("wsd", alpha_max=0.9, alpha_min=0.0, warmup_fraction=0.1, decay_fraction=0.2)
    v = values(s)
    assert v[0] == pytest.approx(0.09) and v[9] == pytest.approx(0.9)
    assert set(v[10:80]) == {0.9}
    assert all(a >= b for a, b in zip(v[80:], v[81:])) and v[-1] == 0.0
    # Short runs never overshoot α_max (fractional warmup lengths round up to whole steps).
    for total in range(1, 40):
        assert max(values(s, total)) <= 0.9 + 1e-12


def test_periodic_cycles():
    v = values(AlphaSchedule("periodic", alpha_max=1.0, alpha_min=0.0, period=10))
    assert v[0] == pytest.approx(0.0) and v[5] == pytest.approx(1.0) and v[10] == pytest.approx(0.0)


def test_salt_phases():
    abrupt = values(AlphaSchedule("salt", alpha_max=0.9, n_kd=30))
    assert set(abrupt[:30]) == {0.9} and set(abrupt[30:]) == {0.0}
    smooth = values(AlphaSchedule("salt", alpha_max=0.9, n_kd=30, transition_steps=9))
    assert smooth[29] == 0.9 and smooth[30] == pytest.approx(0.81) and smooth[38] == pytest.approx(0.09)
    assert set(smooth[39:]) == {0.0}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="step"), "kd.alpha.kind: unknown schedule 'step'"),
        (dict(alpha_min=0.8, alpha_max=0.5), r"kd.alpha.alpha_min \(0.8\) exceeds alpha_max \(0.5\)"),
        (dict(warmup_fraction=0.6, decay_fraction=0.6), "warmup_fraction \\+ decay_fraction must be <= 1"),
        (dict(period=0), "kd.alpha.period must be >= 1"),
        (dict(n_kd=-1), "n_kd and transition_steps must be >= 0"),
    ],
)
def test_invalid_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlphaSchedule(**kwargs).validate()
