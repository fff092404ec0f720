"""Graceful stops (megadistill.preemption), the units: stop signals parsed and refused, a signal
recorded and a second one ignored, the save timer. The runs that stop on a signal and resume are
in tests/integration/test_preemption_runs.py."""

from __future__ import annotations

import os
import signal

import pytest

from megadistill.config import CheckpointConfig, ConfigError, config_from_dict
from megadistill.preemption import StopRequests, parse_signals


def test_signal_names_are_parsed_and_bad_ones_refused():
    assert parse_signals(["SIGTERM", "usr1", "TERM"]) == [signal.SIGTERM, signal.SIGUSR1]
    for bad, words in (("SIGFOO", "not a signal name"), ("SIGKILL", "cannot be used"), ("INT", "cannot be used")):
        with pytest.raises(ValueError, match=f"checkpoint.stop_signals: .*{words}"):
            parse_signals([bad])
    with pytest.raises(ConfigError, match="checkpoint.stop_signals"):
        config_from_dict({"checkpoint": {"stop_signals": ["SIGNOPE"]}})
    with pytest.raises(ConfigError, match="checkpoint.save_interval_minutes must be >= 0"):
        config_from_dict({"checkpoint": {"save_interval_minutes": -1}})


def test_defaults_save_on_a_timer_and_stop_on_term_and_usr1():
    c = CheckpointConfig()
    assert c.save_interval_minutes > 0 and set(c.stop_signals) == {"SIGTERM", "SIGUSR1"}


def test_a_signal_is_recorded_and_a_second_one_ignored():
    now = [0.0]
    stops = StopRequests(["SIGUSR1", "SIGUSR2"], save_interval_minutes=1, clock=lambda: now[0]).install()
    try:
        assert stops.poll().save is False
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # during the save, say: must not raise or replace the first
        d = stops.poll()
        assert d.signal == "SIGUSR2" and d.save and stops.ignored == 1
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_the_timer_asks_for_a_save_and_restarts_after_one():
    now = [100.0]
    stops = StopRequests([], save_interval_minutes=0.5, clock=lambda: now[0])
    now[0] += 29
    assert not stops.poll().timed
    now[0] += 1
    d = stops.poll()
    assert d.timed and d.save and d.signal is None
    stops.saved()
    now[0] += 29
    assert not stops.poll().timed
    assert not StopRequests([], 0, clock=lambda: 1e9).poll().timed  # 0 = off


def test_after_a_stop_further_stop_signals_are_ignored_until_exit():
    stops = StopRequests(["SIGUSR2"], save_interval_minutes=0).install()
    try:
        stops.finish(stopped=True)
        # SIG_IGN, not a Python handler: the interpreter keeps it through its shutdown.
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)  # would end this process with the default action
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    finished = StopRequests(["SIGUSR2"], save_interval_minutes=0).install()
    finished.finish(stopped=False)
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
