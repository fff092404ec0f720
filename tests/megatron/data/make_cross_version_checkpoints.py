"""Write the cross-version checkpoint fixtures (tests/megatron/test_cross_version.py), once per
megatron-core version, with that version's virtualenv:

    .venv/bin/python tests/megatron/data/make_cross_version_checkpoints.py
    .venv-mcore-0.19.2/bin/python tests/megatron/data/make_cross_version_checkpoints.py

Each run trains the tiny GPT of checkpoint_training.py (1 layer, hidden 16: a checkpoint of about
100 KB) on one rank with the distributed optimizer and dropout for 4 steps, saves a committed
checkpoint after step 2 into mcore-<version>/step_00000002, and records in cross_version.json the
loss, grad norm and learning rate of steps 3 and 4 of that uninterrupted run: what a resume from
the checkpoint must reproduce, bit for bit, under any megatron-core that reads it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # checkpoint_training, tests/ helpers

from checkpoint_training import build_training, train_steps  # noqa: E402

from megadistill import _compat  # noqa: E402
from megadistill.megatron.checkpoint import save_checkpoint  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

# The fixture's model and run; the test builds the same.
MODEL = dict(hidden=16, layers=1, dropout=0.1)
SAVE_AT, STEPS = 2, 4
RECORD = HERE / "cross_version.json"


def _write(root: str) -> list:
    ddp, optimizer, scheduler = build_training(**MODEL)
    train_steps(ddp, optimizer, scheduler, range(1, SAVE_AT + 1))
    save_checkpoint(root, SAVE_AT, ddp, optimizer, scheduler)
    return train_steps(ddp, optimizer, scheduler, range(SAVE_AT + 1, STEPS + 1))


def main() -> None:
    version = _compat.installed_version()
    root = HERE / f"mcore-{version}"
    if root.exists():
        shutil.rmtree(root)
    after = run_distributed(_write, 1, str(root))[0]
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    record[version] = {
        "checkpoint": f"mcore-{version}/step_{SAVE_AT:08d}",
        "steps": list(range(SAVE_AT + 1, STEPS + 1)),
        "after_resume": [[float(loss), float(norm), float(lr)] for loss, norm, lr in after],
    }
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"wrote {root} ({size} bytes) and {RECORD.name}[{version!r}]: {record[version]['after_resume']}")


if __name__ == "__main__":
    main()
