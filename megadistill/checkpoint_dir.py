"""Checkpoint directories, whatever the backend: naming, atomic commit, the completion marker.

Layout under a checkpoint root::

    root/step_00000300/          a complete checkpoint
        COMPLETE                 written last, before the rename (JSON: step and the caller's run record)
        ...                      the backend's own files
    root/step_00000400.tmp/      a save in progress, or one that was killed: never loaded

:func:`commit` runs a backend's writer into ``step_XXXXXXXX.tmp``; after every rank finished
(barrier), rank 0 writes the ``COMPLETE`` marker, renames the directory and fsyncs. A save killed
before the rename leaves only the ``.tmp`` directory, which :func:`latest_checkpoint` ignores and
the next save of that step removes. The root must be on a file system every rank sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megadistill.collective import on_every_rank

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``root/step_{step:08d}``: where step ``step`` is saved."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(root) / f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    """True if ``path`` is a checkpoint directory whose save finished (it holds the marker)."""
    path = Path(path)
    return _STEP_DIR.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest *complete* checkpoint under ``root`` (highest step), or None.

    ``*.tmp`` directories (saves in progress or killed), directories without the completion
    marker and anything not named ``step_<digits>`` are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match is None or not entry.is_dir() or not (entry / COMPLETE_MARKER).is_file():
            continue
        step = int(match.group(1))
        if best is None or step > best[0]:
            best = (step, entry)
    return None if best is None else best[1]


def read_marker(path: str | Path) -> dict:
    """The JSON completion marker of a complete checkpoint (``step``, ``layout``, run meta)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete megadistill checkpoint (no {COMPLETE_MARKER} marker: an "
            "interrupted save?)"
        )
    return json.loads((path / COMPLETE_MARKER).read_text())


def commit(root: str | Path, step: int, write: Callable[[Path], None], marker: dict) -> Path:
    """Save step ``step`` atomically: ``write(tmp_dir)`` on every rank, then the marker and rename.

    Collective. ``marker`` (JSON-serialisable, rank 0's copy is written) is stored in the
    ``COMPLETE`` file together with ``step``. Re-saving an existing step replaces it only after
    the new copy is complete. An error on any rank, in any phase, is raised on every rank (none
    is left waiting) and leaves no complete checkpoint behind. Returns the final directory.
    """
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    with on_every_rank(f"preparing checkpoint directory {tmp}"):
        if rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left behind by a killed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
    with on_every_rank(f"writing checkpoint {tmp}"):
        write(tmp)
    with on_every_rank(f"committing checkpoint {final}"):  # after every rank's files are on disk
        if rank == 0:
            _write_synced(tmp / COMPLETE_MARKER, json.dumps({**marker, "step": step}) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step: swap the old copy out before the rename
                old = final.with_name(final.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
