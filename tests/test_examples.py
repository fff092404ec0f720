"""The examples users copy keep working."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kd_loss_quickstart_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kd_loss_quickstart.py")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "TP=1: KD loss" in out and float(out.split("KD loss ")[1].split(";")[0]) > 0
