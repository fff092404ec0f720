"""The examples users copy keep working."""

import os
import subprocess
import sys

from tiny_runs import ROOT


def test_kd_loss_quickstart_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kd_loss_quickstart.py")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "TP=1: KD loss" in out and float(out.split("KD loss ")[1].split(";")[0]) > 0


def test_pretrain_gpt_distill_example_trains():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pretrain_gpt_distill.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=300, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("kd loss=" in line and "lm loss=" in line for line in lines), out
