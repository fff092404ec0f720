"""Graceful stops: a signal (SLURM's pre-timeout ``--signal``, ``scancel``, a preemption, torchrun
passing on a SIGTERM) or a timer turns into "finish this step, save, stop" on every rank at once.

The training loop calls :meth:`StopRequests.poll` once per step. A signal handler only records that
a signal came (Python runs it between bytecodes, so a step in progress is never interrupted); the
poll then all-reduces one small tensor, ``[signal number, save due]`` with MAX, so every rank takes
the same decision at the same step even when the signal reached only some of them (``kill`` of one
process, a launcher that forwards to its own children only). Ranks' clocks for
``checkpoint.save_interval_minutes`` are merged the same way: a save is due when any rank says so.

A second signal while the checkpoint is written is recorded and ignored: the save finishes (and
were the process killed outright, the atomic commit keeps the previous complete checkpoint
loadable). A run stopped this way exits with :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``: "try again
later"), which ``slurm/train.sbatch`` uses to requeue the job.

The launcher's side (:class:`Forwarder`, :func:`launcher_status`): torchrun itself cannot pass that
status on. A stop signal sent to torchrun makes it forward the signal, wait (30 s by default,
``--shutdown-timeout``), SIGKILL what is left and exit 1 with a ``SignalException`` traceback;
workers that exit 75 on their own make it exit 1 too; and a SIGUSR1 it does not handle kills it,
leaving the workers running. ``megadistill torchrun`` (``megadistill.cli.train``) runs torchrun in
its own process with a :class:`Forwarder` in place of torchrun's handler for the stop signals: each
is passed to the workers as it is, torchrun never starts its timed teardown, and the launcher exits
with :data:`EXIT_STOPPED` when the workers did.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

EXIT_STOPPED = 75
"""Exit status of ``megadistill train`` after a graceful stop (checkpoint saved, run unfinished)."""

# Their default action cannot be replaced, or replacing it would break the terminal/debuggers.
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
_NOT_A_STOP = {"SIGINT", "SIGCHLD", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGPIPE", "SIGTRAP"}


def parse_signals(names: Sequence[str], key: str = "checkpoint.stop_signals") -> list[signal.Signals]:
    """Signal names (``SIGTERM``, ``TERM``, ``usr1``) as :class:`signal.Signals`; raises
    ``ValueError`` naming ``key`` for an unknown signal or one that cannot mean "stop" (config
    validation reports it as a ``ConfigError``)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{key}: expected a list of signal names, got {names!r}")
    found = []
    for raw in names:
        name = str(raw).strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if sig is None:
            raise ValueError(f"{key}: {raw!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
        if name in _UNCATCHABLE or name in _NOT_A_STOP:
            raise ValueError(f"{key}: {name} cannot be used to stop a run (it cannot be caught, or means a crash "
                              "or an interactive interrupt); use e.g. SIGTERM, SIGUSR1, SIGUSR2")
        if sig not in found:
            found.append(sig)
    return found


@dataclass(frozen=True)
class Decision:
    """What every rank does after a step (the same on all ranks)."""

    signal: Optional[str] = None
    """Name of the signal that asks to stop (the highest-numbered one any rank received), or None."""
    timed: bool = False
    """``save_interval_minutes`` have passed since the last save on some rank."""

    @property
    def save(self) -> bool:
        """Save a checkpoint after this step."""
        return self.signal is not None or self.timed


class _Handlers:
    """Signal handlers put in place over the process's previous ones, and put back."""

    signals: list
    _previous: dict

    def _replace_handlers(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class StopRequests(_Handlers):
    """Signal handlers and the save timer of one run; see the module docstring.

    ``install()`` replaces the handlers of ``signals`` (only possible in the main thread; elsewhere
    the signals keep their default action, with a warning), ``uninstall()`` puts the previous ones
    back, ``finish()`` ends the run (see there). ``device`` is where the poll's tensor lives (the GPU under nccl). ``clock`` is injectable
    for tests."""

    def __init__(self, signals: Sequence[str], save_interval_minutes: float, device=None,
                 clock: Callable[[], float] = time.monotonic):
        self.signals = parse_signals(signals)
        self.interval_s = 60.0 * float(save_interval_minutes)
        self.device = device
        self.clock = clock
        self.received: Optional[int] = None
        """Number of the first stop signal this process received."""
        self.ignored = 0
        """Further signals received after the first (during the last steps or the save)."""
        self._last_save = clock()
        self._previous: dict = {}

    def install(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                print("megadistill: warning: not in the main thread, so checkpoint.stop_signals are not "
                      "handled (a signal stops the run without a checkpoint)", file=sys.stderr)
            return self
        self._replace_handlers()
        return self

    def finish(self, stopped: bool) -> None:
        """The loop is over: put the previous handlers back, or after a stop ignore the stop signals
        from now on. srun ends a step's other tasks with SIGTERM as soon as one task exits, and a
        Python handler would not protect them (the interpreter resets its handlers while it shuts
        down, SIG_IGN it keeps): the checkpoint is saved, so the process exits with its own status."""
        if not stopped:
            self.uninstall()
            return
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum, frame) -> None:
        # No I/O and no exception here: the handler may run inside the save, between any two bytecodes.
        if self.received is None:
            self.received = signum
        else:
            self.ignored += 1

    def poll(self) -> Decision:
        """Collective (every rank, once per step): whether to save and whether to stop."""
        import torch
        import torch.distributed as dist

        timed = self.interval_s > 0 and self.clock() - self._last_save >= self.interval_s
        flags = [self.received or 0, int(timed)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(flags, dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [int(v) for v in t.tolist()]
        return Decision(signal=signal.Signals(flags[0]).name if flags[0] else None, timed=bool(flags[1]))

    def saved(self) -> None:
        """A checkpoint was just committed: the timer starts again."""
        self._last_save = self.clock()


def install(checkpoint_cfg, device=None) -> StopRequests:
    """:class:`StopRequests` for a run's ``checkpoint`` section, its handlers installed."""
    return StopRequests(checkpoint_cfg.stop_signals, checkpoint_cfg.save_interval_minutes, device).install()


FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1")
"""The signals ``megadistill torchrun`` passes to its workers: the default ``checkpoint.stop_signals``
(SLURM's ``--signal``, ``scancel``, a preemption or a container's stop send one of them)."""


def child_pids(pid: Optional[int] = None) -> list[int]:
    """The live (not zombie) direct children of process ``pid`` (default: this one), from ``/proc``
    (Linux); ``[]`` where ``/proc`` cannot be read."""
    pid = os.getpid() if pid is None else pid
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(name))
    return sorted(found)


class Forwarder(_Handlers):
    """A launcher's stop signals, passed on to its workers (its child processes) unchanged: each
    worker's :class:`StopRequests` then stops the run at the end of a step, saves and exits with
    :data:`EXIT_STOPPED`, while the launcher keeps waiting for them (see the module docstring).

    ``children`` lists the workers' pids (default: this process's children). A signal that comes
    while there is no worker goes to ``alone(signum)`` if given (a launcher's own teardown: it may
    raise) as long as none was forwarded yet (before the workers start); once a stop is under way,
    a signal after the workers ended is dropped. ``install()`` must run in the main thread, before
    the launcher starts; ``uninstall()`` puts the previous handlers back."""

    def __init__(self, signals: Sequence[str] = FORWARDED_SIGNALS, children: Callable[[], list[int]] = child_pids,
                 alone: Optional[Callable[[int], None]] = None):
        self.signals = parse_signals(signals, key="forwarded signals")
        self.children = children
        self.alone = alone
        self.forwarded: list[str] = []
        """Names of the signals passed on so far, in order."""
        self._previous: dict = {}

    def install(self) -> "Forwarder":
        self._replace_handlers()
        return self

    def _handle(self, signum, frame) -> None:
        pids = self.children()
        if not pids:
            if self.alone is not None and not self.forwarded:
                self.alone(signum)
            return
        self.forwarded.append(signal.Signals(signum).name)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # ended meanwhile
                pass


def launcher_status(worker_exitcodes: Iterable[int]) -> Optional[int]:
    """The launcher's exit status for workers that ended with ``worker_exitcodes`` (those a launcher
    reports as failed): :data:`EXIT_STOPPED` when there is at least one and each is
    :data:`EXIT_STOPPED` (a graceful stop: the checkpoint is saved), else None (a failure)."""
    codes = list(worker_exitcodes)
    return EXIT_STOPPED if codes and all(c == EXIT_STOPPED for c in codes) else None
