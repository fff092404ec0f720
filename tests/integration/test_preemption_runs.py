"""Graceful stops (megadistill.preemption) end to end: a SIGTERM/SIGUSR1 mid-run finishes the step on
every rank, saves, exits with EXIT_STOPPED (one process, or 2 ranks under `megadistill torchrun`
whether the launcher or one rank got the signal), and the resumed run reproduces an uninterrupted
one exactly; checkpoint.save_interval_minutes saves on a timer. (The units: tests/test_preemption.py.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from tiny_runs import RESUME_STEPS as STEPS
from tiny_runs import assert_same_losses, complete_checkpoints, launch_train, run_metrics, tiny_run_yaml, wait_for_step

from megadistill.preemption import EXIT_STOPPED
from megadistill.testing.processes import _descendants, kill_9_tree


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus):
    """The uninterrupted reference run (single process)."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_run_yaml(tmp / "full.yaml", tmp / "full", corpus)
    with open(tmp / "full.log", "w") as log:
        assert launch_train(cfg, log).wait(timeout=300) == 0, (tmp / "full.log").read_text()
    return run_metrics(tmp / "full")


# SIGUSR1 takes the same path (one handler for every stop signal): tests/integration/test_slurm.py
# sends it as the time limit's warning and checks the stop, the requeue and the exact resume.
@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_a_signal_stops_with_a_checkpoint_and_the_resumed_run_matches(tmp_path, corpus, full_run, sig):
    out = tmp_path / "run"
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus)
    with open(tmp_path / "stopped.log", "w") as log:
        proc = launch_train(cfg, log)
        wait_for_step(proc, out, 3)
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=120)
    text = (tmp_path / "stopped.log").read_text()
    assert rc == EXIT_STOPPED, text
    stopped_at = max(run_metrics(out))
    assert 3 <= stopped_at < STEPS
    # The checkpoint is of the very step the run stopped after: no step is trained twice or lost.
    assert complete_checkpoints(out) == [stopped_at]
    assert f"stopped by {sig} at step {stopped_at}, checkpoint {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in text
    with open(tmp_path / "resumed.log", "w") as log:
        assert launch_train(cfg, log).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert f"resuming from step {stopped_at}" in (tmp_path / "resumed.log").read_text()
    assert_same_losses(run_metrics(out), full_run)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, corpus):
    """The uninterrupted reference for 2-rank runs. DP=2 on the same global batch: the losses equal
    the single-process run's only up to the order of the gradient reduction."""
    tmp = tmp_path_factory.mktemp("ref2")
    cfg = tiny_run_yaml(tmp / "ref.yaml", tmp / "ref", corpus)
    with open(tmp / "ref.log", "w") as log:
        assert launch_train(cfg, log, nproc=2).wait(timeout=300) == 0, (tmp / "ref.log").read_text()
    return run_metrics(tmp / "ref")


def _stop_and_resume_two_ranks(tmp_path, corpus, reference, signal_whom) -> str:
    """A 2-rank run under ``megadistill torchrun``, ``signal_whom(launcher)`` after step 3: it must
    exit 75 with a checkpoint of the step it stopped after, and the resumed run match ``reference``.
    Returns the stopped attempt's log."""
    out = tmp_path / "run"
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus)
    with open(tmp_path / "stopped.log", "w") as log:
        proc = launch_train(cfg, log, nproc=2)
        try:
            wait_for_step(proc, out, 3)
            signal_whom(proc)
            rc = proc.wait(timeout=120)
        except BaseException:
            kill_9_tree(proc)
            raise
    text = (tmp_path / "stopped.log").read_text()
    stopped_at = max(run_metrics(out))
    assert 3 <= stopped_at < STEPS, text
    assert rc == EXIT_STOPPED, text
    assert complete_checkpoints(out) == [stopped_at], text
    assert f"stopped by SIGTERM at step {stopped_at}" in text
    with open(tmp_path / "resumed.log", "w") as log:
        assert launch_train(cfg, log, nproc=2).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert_same_losses(run_metrics(out), reference)
    return text


def test_two_ranks_agree_to_stop_when_only_one_got_the_signal(tmp_path, corpus, two_rank_run):
    def one_rank(proc):
        workers = [p for p in _descendants(proc.pid) if "megadistill" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) >= 2, workers
        os.kill(max(workers), signal.SIGTERM)  # one rank only

    _stop_and_resume_two_ranks(tmp_path, corpus, two_rank_run, one_rank)


def test_sigterm_to_the_torchrun_launcher_exits_75(tmp_path, corpus, two_rank_run):
    # What SLURM, Kubernetes or a shell's `kill` send to a job: the signal goes to the launcher.
    # Plain torchrun exits 1 here (its SignalException) and would SIGKILL a save longer than its
    # --shutdown-timeout; `megadistill torchrun` passes the signal on and exits with the workers' 75.
    text = _stop_and_resume_two_ranks(tmp_path, corpus, two_rank_run, lambda proc: proc.send_signal(signal.SIGTERM))
    assert "SignalException" not in text and "exit 75" in text


def test_save_interval_minutes_saves_on_a_timer(tmp_path, corpus):
    out = tmp_path / "run"
    # A timer shorter than any step: every step is due for a save.
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus, steps=4, save_interval_minutes=1e-6)
    with open(tmp_path / "run.log", "w") as log:
        assert launch_train(cfg, log).wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    assert complete_checkpoints(out) == [1, 2, 3, 4]
