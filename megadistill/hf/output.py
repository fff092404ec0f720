"""The ``--output`` directory of ``convert-hf`` and ``export-hf``: checks of the path itself, made
before any work, so that a bad path fails in one line instead of after the model has been read."""

from __future__ import annotations

import os
from pathlib import Path

from megadistill.config import ConfigError


def check_output_path(out: Path, error: type[ConfigError]) -> None:
    """Raise ``error`` in one line naming ``out`` if it cannot become a directory this process
    writes: it is a file, it lies below a file, or the nearest existing directory on its path is
    not writable. What ``out`` already holds is the caller's to judge."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if existing == out and not out.is_dir():
        raise error(f"--output {out} is {'a file' if out.is_file() else 'not a directory'}: give a directory")
    if not existing.is_dir():
        raise error(f"--output {out}: {existing} is {'a file' if existing.is_file() else 'not a directory'}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"--output {out}: {existing} is not writable")
