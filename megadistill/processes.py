"""Processes forked while a checkpoint is written die with the process that forked them.

megatron-core 0.16's torch_dist writer forks one process per write bucket for every save (even a
synchronous one); each waits for the rank after writing (0.19's writes from threads: nothing to
do there, and the guard costs nothing). A rank killed with SIGKILL during a
save leaves them blocked forever (on a futex), reparented to PID 1. Children forked inside
:func:`children_die_with_this_process` ask the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) for a
SIGKILL when their parent dies. Used by every checkpoint writer: ``checkpoint_dir.commit``,
``megatron.checkpoint`` and ``hf.convert``.
"""

from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

_PR_SET_PDEATHSIG = 1
_writer_pid: Optional[int] = None  # set while this process writes a checkpoint; inherited by children
_prctl: Optional[Callable[..., int]] = None
_fork_hook_installed = False


@contextmanager
def children_die_with_this_process() -> Iterator[None]:
    """Processes forked (``os.fork``, multiprocessing's fork context) by this thread within the
    block are SIGKILLed by the kernel when it dies, and so are their own children. Linux only
    (elsewhere a no-op). Reentrant."""
    global _writer_pid
    _install_fork_hook()
    previous, _writer_pid = _writer_pid, os.getpid()
    try:
        yield
    finally:
        _writer_pid = previous


def _install_fork_hook() -> None:
    global _fork_hook_installed, _prctl
    if _fork_hook_installed:
        return
    try:  # resolved here, not in the child: a freshly forked child should do as little as possible
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        _prctl = None
    os.register_at_fork(after_in_child=_die_with_parent)
    _fork_hook_installed = True


def _die_with_parent() -> None:
    """In a child forked while a checkpoint is written: die when the parent does."""
    global _writer_pid
    if _writer_pid is None or _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _writer_pid:  # the parent died before the request took effect
        os._exit(1)
    _writer_pid = os.getpid()  # its own children die with it in turn
