"""Errors and results that reach every rank: a step that may fail on some ranks only (file system
work, say) must not leave the others waiting in the next collective. Plain local calls without a
process group."""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shareable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to be sent to the other ranks), else a RuntimeError
    carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on global rank 0 only (one view of a shared file system); its result -- or whatever
    it raised, raised on every rank -- shared with all. Collective. Any exception counts: one that
    escaped rank 0 before the broadcast would leave the other ranks waiting in it forever."""
    rank, world = rank_world()
    outcome: list = [None, None]
    if rank == 0:
        try:
            outcome[0] = fn()
        except BaseException as e:  # any: every failure must reach the other ranks
            outcome[1] = shareable(e)
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


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
