"""Graceful stops (megadistill.preemption): a SIGTERM/SIGUSR1 mid-run finishes the step on every
rank, saves, exits with EXIT_STOPPED, and the resumed run reproduces an uninterrupted one exactly;
checkpoint.save_interval_minutes saves on a timer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from megadistill.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainingConfig,
    config_from_dict,
    to_dict,
)
from megadistill.preemption import EXIT_STOPPED, StopRequests, parse_signals
from megadistill.testing.distributed import free_port
from megadistill.testing.processes import _descendants, kill_9_tree

ROOT = Path(__file__).resolve().parents[1]
STEPS = 14


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small preprocessed corpus: (data prefix, tokenizer model)."""
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(embedded_corpus_text()[:60_000])
    result = preprocess([str(root / "a.txt")], root / "data" / "corpus", vocab_size=512, progress=False)
    return str(result.prefix), str(result.tokenizer_model)


def tiny_run_yaml(path: Path, out: Path, corpus, steps: int = STEPS, **checkpoint) -> Path:
    """Write a run file for a tiny student (dropout on: an exact resume needs the RNG states too)."""
    prefix, tok = corpus
    cfg = RunConfig(
        name=out.name, output_dir=str(out),
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.1),
        data=DataConfig(data_prefix=prefix, tokenizer_model=tok, seq_length=32, micro_batch_size=4, global_batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_fraction=0.1),
        training=TrainingConfig(train_steps=steps, eval_interval=steps, eval_steps=1, log_interval=1),
        checkpoint=replace(CheckpointConfig(), **checkpoint),
    )
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(cfg_path, log, nproc: int = 1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "megadistill", "train", str(cfg_path), "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "megadistill", "train", str(cfg_path), "--no-progress"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)


def _losses(out: Path) -> dict:
    from megadistill.metrics import read_metrics

    return read_metrics(out) if (out / "metrics.jsonl").is_file() else {}


def _checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file())


def _wait_for_step(proc, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(_losses(out), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never logged step {step} (exit status {proc.poll()})")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus):
    """The uninterrupted reference run (single process)."""
    tmp = tmp_path_factory.mktemp("full")
    cfg = tiny_run_yaml(tmp / "full.yaml", tmp / "full", corpus)
    with open(tmp / "full.log", "w") as log:
        assert _launch(cfg, log).wait(timeout=300) == 0, (tmp / "full.log").read_text()
    return _losses(tmp / "full")


def assert_same_losses(resumed: dict, full: dict, steps: int = STEPS) -> None:
    """Every step's losses and gradient norm bitwise equal (the last logged copy of a step counts)."""
    assert set(resumed) == set(range(1, steps + 1)), sorted(resumed)
    for step in range(1, steps + 1):
        for key in ("total loss", "lm loss", "grad_norm"):
            assert resumed[step].get(key) == full[step].get(key), (step, key, resumed[step].get(key), full[step].get(key))
    assert resumed[steps]["val_loss"] == full[steps]["val_loss"]


# --------------------------------------------------------------------------- units


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


# --------------------------------------------------------------------------- end to end


# SIGUSR1 takes the same path (one handler for every stop signal): tests/test_slurm.py sends it as
# the time limit's warning and checks the stop, the requeue and the exact resume.
@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_a_signal_stops_with_a_checkpoint_and_the_resumed_run_matches(tmp_path, corpus, full_run, sig):
    out = tmp_path / "run"
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus)
    with open(tmp_path / "stopped.log", "w") as log:
        proc = _launch(cfg, log)
        _wait_for_step(proc, out, 3)
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=120)
    text = (tmp_path / "stopped.log").read_text()
    assert rc == EXIT_STOPPED, text
    stopped_at = max(_losses(out))
    assert 3 <= stopped_at < STEPS
    # The checkpoint is of the very step the run stopped after: no step is trained twice or lost.
    assert _checkpoints(out) == [stopped_at]
    assert f"stopped by {sig} at step {stopped_at}, checkpoint {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in text
    with open(tmp_path / "resumed.log", "w") as log:
        assert _launch(cfg, log).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert f"resuming from step {stopped_at}" in (tmp_path / "resumed.log").read_text()
    assert_same_losses(_losses(out), full_run)


def test_two_ranks_agree_to_stop_when_only_one_got_the_signal(tmp_path, corpus, full_run):
    # DP=2 on the same global batch: the losses equal the single-process run's only up to the
    # order of the gradient reduction, so the reference here is an uninterrupted 2-rank run.
    ref, out = tmp_path / "ref", tmp_path / "run"
    ref_cfg = tiny_run_yaml(tmp_path / "ref.yaml", ref, corpus)
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus)
    with open(tmp_path / "ref.log", "w") as log:
        assert _launch(ref_cfg, log, nproc=2).wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()
    with open(tmp_path / "stopped.log", "w") as log:
        proc = _launch(cfg, log, nproc=2)
        try:
            _wait_for_step(proc, out, 3)
            workers = [p for p in _descendants(proc.pid) if "megadistill" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            assert len(workers) >= 2, workers
            os.kill(max(workers), signal.SIGTERM)  # one rank only
            rc = proc.wait(timeout=120)
        except BaseException:
            kill_9_tree(proc)
            raise
    text = (tmp_path / "stopped.log").read_text()
    stopped_at = max(_losses(out))
    assert 3 <= stopped_at < STEPS, text
    assert rc != 0 and f"exitcode  : {EXIT_STOPPED}" in text, text  # torchrun reports each worker's status
    assert _checkpoints(out) == [stopped_at], text
    assert f"stopped by SIGTERM at step {stopped_at}" in text
    with open(tmp_path / "resumed.log", "w") as log:
        assert _launch(cfg, log, nproc=2).wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()
    assert_same_losses(_losses(out), _losses(ref))


def test_save_interval_minutes_saves_on_a_timer(tmp_path, corpus):
    out = tmp_path / "run"
    # A timer shorter than any step: every step is due for a save.
    cfg = tiny_run_yaml(tmp_path / "run.yaml", out, corpus, steps=4, save_interval_minutes=1e-6)
    with open(tmp_path / "run.log", "w") as log:
        assert _launch(cfg, log).wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    assert _checkpoints(out) == [1, 2, 3, 4]


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
