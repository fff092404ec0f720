"""``megadistill train``: one YAML-configured run under torchrun, srun or as one process;
``megadistill torchrun``: torchrun, with a graceful stop's exit status 75 passed on."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from megadistill import launch
from megadistill.config import load_config
from megadistill.preemption import EXIT_STOPPED, FORWARDED_SIGNALS
from megadistill.preflight import preflight


def _train(args) -> int:
    # The launch decides the world size the config is checked against, before any process group
    # starts; a job given GPUs that torch cannot use stops here rather than training on gloo.
    where = launch.resolve()
    cfg = load_config(args.config, args.overrides, world_size=where.world_size)
    preflight(cfg)
    launch.choose_backend()
    from megadistill.train import run

    try:
        result = run(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    finally:
        _close_process_groups()
    if result.stopped_by is not None:
        # Saved and unfinished: a distinct status, so a job script can requeue (slurm/train.sbatch).
        return EXIT_STOPPED
    return 0 if result.steps == cfg.training.train_steps else 1


def _close_process_groups() -> None:
    """Tear down Megatron's groups and the default process group before the interpreter exits: a
    gloo group left to the exit can abort the process ("terminate called without an active
    exception", status -6) after a run that finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _torchrun(args) -> int:
    """torchrun's own launcher (``torch.distributed.run``) in this process, with its arguments
    unchanged, except that SIGTERM and SIGUSR1 are passed to the workers as they come
    (``preemption.Forwarder``) instead of starting torchrun's teardown (forward, wait
    ``--shutdown-timeout``, SIGKILL, exit 1). Returns 75 when every worker that torchrun reports
    failed exited with 75; torchrun's own result otherwise (0, or its error and status 1)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    from megadistill.preemption import Forwarder, launcher_status

    targs = torchrun.parse_args(args.torchrun_args)
    if not hasattr(targs, "signals_to_handle"):
        import torch

        raise launch.LaunchError(
            f"megadistill torchrun needs torchrun's --signals-to-handle (torch >= 2.9; this is torch {torch.__version__}): "
            "use `srun` or a single process, or plain torchrun (which exits 1 after a graceful stop)"
        )
    # torchrun installs its handlers when it starts the workers: leave it the others (SIGINT, SIGHUP, SIGQUIT).
    ours = set(FORWARDED_SIGNALS)
    targs.signals_to_handle = ",".join(
        s for s in (x.strip() for x in targs.signals_to_handle.split(",")) if s and s not in ours
    ) or "SIGINT"

    def alone(signum: int) -> None:
        # No worker to stop yet: torchrun's own reaction (tear down, exit 1).
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    forwarder = Forwarder(FORWARDED_SIGNALS, alone=alone).install()
    try:
        with _stopping_workers_finish():
            record(torchrun.run)(targs)
    except ChildFailedError as e:
        status = launcher_status(f.exitcode for f in e.failures.values())
        if status is None:
            raise
        after = f" after {', '.join(forwarder.forwarded)}" if forwarder.forwarded else ""
        print(f"megadistill torchrun: the workers stopped gracefully{after} (exit {status}: a checkpoint is saved, "
              "resubmit to resume)", file=sys.stderr, flush=True)
        return status
    finally:
        forwarder.uninstall()
    return 0


@contextlib.contextmanager
def _stopping_workers_finish():
    """While torchrun runs in this process: a worker that exits with :data:`EXIT_STOPPED` does not
    start torchrun's teardown of the others. torchrun ends every worker as soon as one exits
    non-zero; in a graceful stop the ranks save collectively and exit 75 a few milliseconds apart,
    so the teardown would kill a rank still writing its part of the checkpoint (and report a
    failure). Every worker ends by itself here once one exited 75 and none failed otherwise; any
    other failure is torchrun's as before. Wraps ``SubprocessContext._poll``, the one place
    torchrun (torch 2.9-2.13) decides to close the workers; the test of `megadistill torchrun`'s
    graceful stop checks it still does."""
    from torch.distributed.elastic.multiprocessing import api

    poll = api.SubprocessContext._poll

    def _poll(self):
        codes = [h.proc.poll() for h in self.subprocess_handlers.values()]
        ended = [c for c in codes if c is not None]
        if None in codes and EXIT_STOPPED in ended and all(c in (0, EXIT_STOPPED) for c in ended):
            return None  # the others are finishing the same stop: let them
        return poll(self)

    api.SubprocessContext._poll = _poll
    try:
        yield
    finally:
        api.SubprocessContext._poll = poll


def add_commands(sub) -> None:
    """Add ``train`` and ``torchrun`` to the ``megadistill`` subparsers ``sub``."""
    t = sub.add_parser(
        "train",
        help="train per a YAML run file (under torchrun/srun for several ranks)",
        description=(
            "Train per a YAML run file. Ranks come from torchrun (RANK/WORLD_SIZE) or from an srun step "
            "(SLURM_PROCID/SLURM_STEP_NUM_TASKS), else this is one process; inside a multi-task SLURM "
            "allocation, launch with srun. The config is checked against that world size first."
        ),
    )
    t.add_argument("config", help="run YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kd.temperature=2.0")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh even though output_dir holds an earlier run: its checkpoints and logs are "
                        "moved aside to output_dir/superseded-<UTC time>/ (never deleted)")
    t.set_defaults(fn=_train)
    r = sub.add_parser(
        "torchrun",
        # Every argument is torchrun's (or the workers'): none is parsed here.
        prefix_chars="\0",
        help="torchrun that exits 75 after a graceful stop: megadistill torchrun --nproc-per-node N -m megadistill train run.yaml",
        description=(
            "torchrun (torch.distributed.run) with the same arguments, except that SIGTERM and SIGUSR1 reach the "
            "workers unchanged (they finish the step, save and exit 75) instead of torchrun's teardown (SIGKILL "
            "after --shutdown-timeout, exit 1); exits 75 when the workers did. `megadistill torchrun --help` "
            "shows torchrun's options."
        ),
    )
    r.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="torchrun's arguments, then the command to run")
    r.set_defaults(fn=_torchrun)
