"""Errors that reach every rank: a step that may fail on some ranks only (file system work, say)
must not leave the others waiting in the next collective."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist


@contextmanager
def on_every_rank(what: str) -> Iterator[None]:
    """Run the block (on any subset of ranks' own work), then agree: if it raised on any rank,
    raise a ``RuntimeError`` naming the ranks and their errors on every rank. Collective."""
    error = None
    try:
        yield
    except Exception as e:  # shared below, then raised everywhere
        error = e
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        detail = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise RuntimeError(f"{what} failed ({detail})") from error
