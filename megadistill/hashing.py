"""Content identities: the SHA-256 of a file, streamed.

Data, tokenizers, checkpoints and stores are identified by what they hold, never by their path."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 of a file, streamed in 1 MiB blocks (any size, constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
