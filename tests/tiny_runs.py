"""Plain helpers that several test directories share (the shared *fixtures* are in conftest.py):
the repository root, the tiny student and teacher, run configs over the ``corpus`` and
``mixed_corpus`` fixtures, running training in a forked rank or ``megadistill train`` as a process
of its own, and reading a run's metrics and checkpoints back.

Importable from any test module as ``tiny_runs`` (pyproject.toml puts tests/ on pytest's
``pythonpath``). Not a test module: nothing here is collected.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import yaml

from megadistill.config import (
    CheckpointConfig,
    DataConfig,
    KDConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TeacherConfig,
    TrainingConfig,
    to_dict,
)
from megadistill.metrics import read_metrics
from megadistill.schedules import AlphaSchedule
from megadistill.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (README.md, examples/, slurm/); also the working directory of launched runs."""

STUDENT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
TEACHER = ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=4)
SEQ = 32
"""The sequence length of a ``tiny_run``."""


class Corpus(NamedTuple):
    """The ``corpus`` fixture: a preprocessed corpus."""

    prefix: str  # Megatron data prefix (.bin/.idx)
    tokenizer: str  # its sentencepiece model


class MixedCorpus(NamedTuple):
    """The ``mixed_corpus`` fixture: its text inputs and the corpus preprocessed from them."""

    inputs: list[str]  # two text files and a JSONL file
    prefix: str
    tokenizer: str


# --------------------------------------------------------------------------- run configs


def tiny_run(out, corpus: Corpus | MixedCorpus, *, steps: int = 4, eval_interval: int | None = None, **sections) -> RunConfig:
    """A plain LM run of ``STUDENT`` on ``corpus`` into ``out``: sequences of ``SEQ`` tokens, micro-batch
    4, global batch 8, ``steps`` steps validated every ``eval_interval`` (default: at the last step),
    every step logged, no checkpoints. ``sections`` replace whole sections (``training=`` replaces
    ``steps`` and ``eval_interval`` too)."""
    cfg = RunConfig(
        name=Path(out).name,
        output_dir=str(out),
        model=STUDENT,
        data=DataConfig(data_prefix=corpus.prefix, tokenizer_model=corpus.tokenizer, seq_length=SEQ, micro_batch_size=4,
                        global_batch_size=8),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, warmup_fraction=0.1),
        training=TrainingConfig(train_steps=steps, eval_interval=eval_interval or steps, eval_steps=1, log_interval=1),
        checkpoint=CheckpointConfig(save_interval=0),
    )
    return replace(cfg, **sections)


def online_kd_run(out, corpus, teacher_dir, *, steps: int = 12, eval_interval: int = 6, **sections) -> RunConfig:
    """``tiny_run`` distilling from an online ``TEACHER`` saved in ``teacher_dir`` (top-p 0.95,
    top-k 20, ghost bucket, constant α 0.5): 12 steps validated at 6 and 12 unless ``sections`` say
    otherwise."""
    return tiny_run(
        out, corpus, steps=steps, eval_interval=eval_interval,
        teacher=TeacherConfig(mode="online", model=TEACHER, checkpoint=str(teacher_dir)),
        kd=KDConfig(top_p=0.95, top_k=20, truncation="ghost", alpha=AlphaSchedule("constant", alpha_max=0.5)),
        **sections,
    )


# --------------------------------------------------------------------------- running


def run_training(cfg: RunConfig):
    """``megadistill.train.run`` without a progress bar (the function to hand to ``run_distributed``)."""
    from megadistill.train import run

    return run(cfg, progress=False)


def run_precompute(cfg: RunConfig, samples_per_shard: int = 8, **kw):
    """``megadistill.store.precompute.precompute`` without a progress bar, ``samples_per_shard`` a shard."""
    from megadistill.store.precompute import precompute

    return precompute(cfg, progress=False, samples_per_shard=samples_per_shard, **kw)


def run_metrics(out) -> dict[int, dict]:
    """The run's metrics by step (a resumed run drops the killed attempt's lines after its checkpoint
    and logs those steps again); {} before the first step is logged."""
    return read_metrics(out)


def _launch_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch_train(cfg_path, log, nproc: int = 1) -> subprocess.Popen:
    """``megadistill train cfg_path`` as a process of its own (for ``nproc`` > 1 under ``megadistill
    torchrun``, as the README says), its output to ``log``. A session of its own: kill -9 of the
    group takes the launcher and every rank at once, as a node failure does."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megadistill", "train", str(cfg_path), "--no-progress"]
    else:
        cmd = [sys.executable, "-m", "megadistill", "torchrun", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), "-m", "megadistill", "train", str(cfg_path), "--no-progress"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_launch_env(), cwd=ROOT, start_new_session=True)


def complete_checkpoints(out: Path) -> list[int]:
    """The steps of the run's complete (committed) checkpoints, in order."""
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file())


def wait_for_step(proc, out: Path, step: int, timeout: float = 240) -> None:
    """Until the launched run ``proc`` has logged ``step``; fails if it exits or times out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if max(run_metrics(out), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never logged step {step} (exit status {proc.poll()})")


# --------------------------------------------------------------------------- stop and resume

RESUME_STEPS = 14
"""The length of a ``tiny_run_yaml`` run."""


def tiny_run_yaml(path: Path, out: Path, corpus, steps: int = RESUME_STEPS, **checkpoint) -> Path:
    """Write a run file for a tiny student (dropout on: an exact resume needs the RNG states too)."""
    cfg = tiny_run(out, corpus, steps=steps, model=replace(STUDENT, hidden_dropout=0.1),
                   checkpoint=replace(CheckpointConfig(), **checkpoint))
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def assert_same_losses(resumed: dict, full: dict, steps: int = RESUME_STEPS) -> None:
    """Every step's losses and gradient norm bitwise equal (the last logged copy of a step counts)."""
    assert set(resumed) == set(range(1, steps + 1)), sorted(resumed)
    for step in range(1, steps + 1):
        for key in ("total loss", "lm loss", "grad_norm"):
            assert resumed[step].get(key) == full[step].get(key), (step, key, resumed[step].get(key), full[step].get(key))
    assert resumed[steps]["val_loss"] == full[steps]["val_loss"]
