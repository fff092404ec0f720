"""Graceful stops (megadistill.preemption), the units: stop signals parsed and refused, a signal
recorded and a second one ignored, the save timer; the launcher's side (signals forwarded to the
workers, the exit status) and `megadistill torchrun` against plain torchrun with stand-in workers.
The runs that stop on a signal and resume are in tests/integration/test_preemption_runs.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from tiny_runs import ROOT

from megadistill.config import CheckpointConfig, ConfigError, config_from_dict
from megadistill.preemption import EXIT_STOPPED, Forwarder, StopRequests, child_pids, launcher_status, parse_signals
from megadistill.testing.distributed import free_port
from megadistill.testing.processes import kill_9_tree


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


def test_a_launcher_forwards_stop_signals_to_its_workers():
    # A stand-in worker: stops on SIGUSR2 with status 75, as a rank does after its save.
    code = "import signal, sys, time; signal.signal(signal.SIGUSR2, lambda *a: sys.exit(75)); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    alone = []
    try:
        assert child.stdout.readline() == "ready\n"
        assert child.pid in child_pids()
        forwarder = Forwarder(["SIGUSR2"]).install()
        try:
            os.kill(os.getpid(), signal.SIGUSR2)  # the launcher's signal: this process survives it
            assert child.wait(timeout=30) == EXIT_STOPPED
            assert forwarder.forwarded == ["SIGUSR2"]
            forwarder.alone = alone.append
            os.kill(os.getpid(), signal.SIGUSR2)  # the workers are done: a late signal changes nothing
            assert alone == [] and forwarder.forwarded == ["SIGUSR2"]
        finally:
            forwarder.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    finally:
        child.kill()
        child.wait()
    # No worker (yet, or any more): the launcher's own reaction.
    forwarder = Forwarder(["SIGUSR2"], children=list, alone=alone.append).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        forwarder.uninstall()
    assert alone == [signal.SIGUSR2] and forwarder.forwarded == []


def test_the_launcher_exits_75_only_when_every_failed_worker_did():
    assert launcher_status([75, 75]) == EXIT_STOPPED == launcher_status([75])
    assert launcher_status([75, 1]) is None and launcher_status([-9]) is None and launcher_status([]) is None


_SLOW_SAVER = """
    import os, signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    (out / f"ready.{os.environ['RANK']}").touch()
    while not stop:
        time.sleep(0.05)
    time.sleep(2)  # a save longer than the launcher's --shutdown-timeout 1
    (out / f"saved.{os.environ['RANK']}").touch()
    if os.environ["RANK"] == "0":
        # Rank 0 is still ending when rank 1 has exited 75 (as a train rank tears down its process
        # groups and the interpreter after its stop handlers are gone): torchrun's teardown of the
        # others would kill it here and report a failure.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(2)
    sys.exit(75)
"""


@pytest.mark.parametrize("launcher", ["megadistill torchrun", "torchrun"])
def test_sigterm_to_the_launcher_lets_the_workers_save_and_exit_75(tmp_path, launcher):
    # README, "Graceful stop": plain torchrun ends a stop with exit 1 (its SignalException) and
    # SIGKILLs the workers --shutdown-timeout seconds after forwarding the signal; `megadistill
    # torchrun` forwards it without a deadline and exits with the workers' 75.
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_SLOW_SAVER))
    runner = ["megadistill", "torchrun"] if launcher == "megadistill torchrun" else ["torch.distributed.run"]
    cmd = [sys.executable, "-m", *runner, "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--shutdown-timeout", "1", str(script), str(tmp_path)]
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 120
            while len(list(tmp_path.glob("ready.*"))) < 2:
                assert time.time() < deadline and proc.poll() is None, (tmp_path / "launcher.log").read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            kill_9_tree(proc)
    text = (tmp_path / "launcher.log").read_text()
    saved = sorted(p.name for p in tmp_path.glob("saved.*"))
    if launcher == "megadistill torchrun":
        assert rc == EXIT_STOPPED and saved == ["saved.0", "saved.1"], text
        assert "SignalException" not in text
    else:
        assert rc == 1 and saved == [] and "SignalException" in text, text
