"""The metrics log (megadistill.metrics): a resumed run's metrics.jsonl holds every step once, the
resumed attempt's line, each with its wall-clock time. The runs killed and resumed end to end are
in tests/integration/test_train.py."""

from __future__ import annotations

import json
import time

import pytest

from megadistill import metrics
from megadistill.metrics import MetricsLogger, keep_steps_up_to, read_metrics


def _line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "time": 1.0, "total loss": loss}) + "\n"


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_run_logs_each_step_once_with_its_time(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # The killed attempt: steps 1-8 logged, the last checkpoint at step 6, a partial line at the end.
    path.write_text("".join(_line(s, 10.0 - s) for s in range(1, 9)) + '{"step": 9, "tot')
    before = time.time()
    logger = MetricsLogger(tmp_path, start=6, log_interval=1)
    assert _steps(path) == list(range(1, 7))
    for s in range(7, 11):
        logger.log(s, {"total loss": 100.0 + s})
    logger.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11))  # each step exactly once, in order
    assert all(r["total loss"] == 100.0 + r["step"] for r in lines[6:])  # the resumed attempt's values
    assert all(r["total loss"] == 10.0 - r["step"] for r in lines[:6])
    # Times are kept to the millisecond (rounded): a line written in the millisecond `before` was
    # taken may read up to 0.5 ms earlier than it.
    assert all(before - 5e-4 <= r["time"] <= time.time() + 5e-4 for r in lines[6:])
    assert set(read_metrics(tmp_path)) == set(range(1, 11))


def test_a_log_with_repeated_steps_keeps_each_steps_last_line(tmp_path):
    # An older attempt's leftovers: steps 7 and 8 logged twice, then a resume from step 9.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_line(s, 1.0) for s in range(1, 9)) + "".join(_line(s, 2.0) for s in range(7, 11)))
    assert keep_steps_up_to(path, 9) == 3
    assert _steps(path) == list(range(1, 10))
    assert [r["total loss"] for r in map(json.loads, path.read_text().splitlines())][6:] == [2.0, 2.0, 2.0]


def test_a_log_that_needs_nothing_dropped_is_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(_line(s, 1.0) for s in range(1, 5)))
    inode = path.stat().st_ino
    assert keep_steps_up_to(path, 4) == 0 and keep_steps_up_to(tmp_path / "none.jsonl", 4) == 0
    assert path.stat().st_ino == inode and _steps(path) == [1, 2, 3, 4]


def test_the_log_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(_line(s, 1.0) for s in range(1, 9))
    path.write_text(text)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(metrics.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        keep_steps_up_to(path, 6)
    # The old log whole, no temporary file left beside it.
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    monkeypatch.undo()
    assert keep_steps_up_to(path, 6) == 2 and _steps(path) == list(range(1, 7))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
