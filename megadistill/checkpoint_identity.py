"""Checkpoints known by their content: a teacher named by a path (a checkpoint or a run directory),
and the identities runs, stores and score files record of the checkpoints they depend on.

Cheap where the ``COMPLETE`` marker records checksums (``megadistill.checkpoint_dir``): the sha256
of that table stands for every file, which ``checkpoint_dir.verify`` checks against it; otherwise
every file is read once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from megadistill.checkpoint_dir import latest_checkpoint, recorded_files
from megadistill.config import ConfigError


def resolve_teacher_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory whose latest complete checkpoint is used."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"teacher.checkpoint: {p} does not exist")
    if (p / "metadata.json").is_file() or (p / ".metadata").is_file():
        return p
    for root in (p, p / "checkpoints"):
        latest = latest_checkpoint(root) if root.is_dir() else None
        if latest is not None:
            return Path(latest)
    raise ConfigError(f"teacher.checkpoint: {p} holds no complete distributed checkpoint")


def checkpoint_identity(ckpt: Path) -> dict:
    """A checkpoint's identity by content: the sha256 over every file in it (relative path +
    content), with its resolved path and file count for the reader, and its
    :func:`content_sha256` (None without checksums in its marker), by which a later reader knows it
    again without reading its files."""
    digest = hashlib.sha256()
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    for p in files:
        digest.update(str(p.relative_to(ckpt)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return {"path": str(ckpt.resolve()), "num_files": len(files), "files_sha256": digest.hexdigest(),
            "content_sha256": content_sha256(ckpt)}


def content_sha256(ckpt: str | Path) -> Optional[str]:
    """A checkpoint's identity by content, read from its ``COMPLETE`` marker alone: the sha256 of
    the table of files the marker records (each other file's relative path, size and sha256). A
    copy or a move keeps it, a change to any file changes it; who wrote the checkpoint (the run
    record beside the table) does not enter it. Cheap, since no other file is read, and as good as
    the files once :func:`verify` passed, which checks them against that very table. None where
    there is no marker or it records no checksums (another tool's checkpoint, or one written
    before checksums existed).

    The marker is looked for whatever the directory is called: a teacher moved to a directory of
    another name is still known by its content."""
    files = recorded_files(ckpt)
    if files is None:
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def content_identity(ckpt: str | Path) -> dict:
    """What a run records about a checkpoint it depends on (its teacher), to know it again by
    content: its resolved path, for the reader, and :func:`content_sha256`; for a checkpoint whose
    marker records no checksums, :func:`checkpoint_identity` (every file read, once)."""
    path = Path(ckpt)
    content = content_sha256(path)
    if content is None:
        return checkpoint_identity(path)
    return {"path": str(path.resolve()), "content_sha256": content}


def same_content(recorded: dict, ckpt: str | Path, read_files: bool = True) -> tuple[Optional[bool], Optional[str], Optional[str]]:
    """Whether the checkpoint ``ckpt`` holds the content that ``recorded`` (a
    :func:`content_identity` or :func:`checkpoint_identity`) names, by the cheapest digest both
    have: ``content_sha256`` from the markers, else ``files_sha256``, which reads every file of
    ``ckpt`` -- unless ``read_files`` is False: then the answer is None (undecided).

    Returns ``(answer, recorded digest, ckpt's digest)``: the two digests compared, for messages."""
    recorded_content, current = recorded.get("content_sha256"), content_sha256(ckpt)
    if recorded_content and current:
        return current == recorded_content, recorded_content, current
    recorded_files = recorded.get("files_sha256")
    if recorded_files:
        if not read_files:
            return None, recorded_files, None
        current_files = checkpoint_identity(Path(ckpt))["files_sha256"]
        return current_files == recorded_files, recorded_files, current_files
    # Known by the table of a marker that ``ckpt`` lacks: not the checkpoint recorded.
    return False, recorded_content, current
