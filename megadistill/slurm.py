"""``megadistill slurm render``: an ``sbatch`` script for one run, with the job geometry, signals,
logs and rendezvous derived from the run file and the command line rather than edited by hand.

What every rendered script does, and why:

- one task per GPU (``--ntasks-per-node`` = ``--gpus-per-node``); with ``--gpus-per-node 0`` the
  tasks are CPU processes and no GPU gres is asked for (a node without gres refuses any);
- ``--signal=B:USR1@<seconds>``: SLURM signals the batch shell that long before the time limit;
  the shell passes it to the tasks through srun, the driver finishes its step, saves and exits
  with :data:`megadistill.preemption.EXIT_STOPPED`, and the shell requeues the job
  (``--requeue``), which resumes from that checkpoint. ``scancel`` sends SIGTERM to the tasks:
  the same graceful stop, without the requeue;
- ``--open-mode=append`` and ``--output=<output_dir>/slurm/%x-%j.out``: a requeued job appends to
  its own log, next to the run's checkpoints instead of the submit directory;
- the launcher variables a submitting shell may have exported (``RANK``, ``WORLD_SIZE``,
  ``MASTER_*``, torchrun's) are cleared; ``MASTER_ADDR`` is the job's first node, ``MASTER_PORT``
  ``20000 + job id mod 10000``, so jobs sharing a node do not collide;
- ``OMP_NUM_THREADS`` from ``--cpus-per-task``, NCCL's asynchronous error handling on;
- the job name (the run's ``name``), partition, account and log path are quoted for sbatch's own
  ``#SBATCH`` line parser when they hold blanks, quotes or ``#``; a ``name`` with ``/`` (it becomes
  part of the log's file name, ``%x``) or a line break is refused, and so is a ``--time`` in a
  format sbatch does not take or not longer than ``--signal-seconds``;
- ``precompute`` with ``--array N``: a job array of ``N`` tasks (``--array=0-(N-1)``, logs
  ``%x-%A_%a.out``), each an ordinary job of the geometry above computing every ``N``-th shard of
  the store (``precompute-logits`` reads its share from ``SLURM_ARRAY_TASK_ID``/``_COUNT``); the
  task that completes the set writes the manifest.

Relative paths (the run file, ``output_dir``) are taken relative to the directory ``sbatch`` is run
from, as the driver takes them. :func:`write` checks that the script's directory and the log
directory can be created and written to before it writes either. The templates are ``train`` (``megadistill train``),
``precompute`` (``megadistill precompute-logits``) and ``score`` (``megadistill score-data``); the
latter two resume where they were killed, so their shell simply requeues the job on the signal.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megadistill.preemption import EXIT_STOPPED

KINDS = {
    "train": ("train", "train.sbatch"),
    "precompute": ("precompute-logits", "precompute.sbatch"),
    "score": ("score-data", "score.sbatch"),
}
"""Template name -> (megadistill subcommand, the checked-in example's file name)."""

PORT_BASE, PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class Job:
    """The job geometry and scheduling options of a rendered script."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None
    """Tasks (ranks) per node; None = one per GPU (1 without GPUs)."""
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    signal_seconds: int = 300
    """Seconds before the time limit the USR1 comes: enough to finish a step and save."""
    python: str = "python"
    """The interpreter the tasks run (one with megadistill installed, on every node)."""
    array: Optional[int] = None
    """``precompute`` only: a job array of this many tasks, each computing its share of the shards."""

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


# The --time formats sbatch accepts (man sbatch): minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds; and no limit.
_TIME = re.compile(r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)")
_NO_LIMIT = ("infinite", "unlimited", "-1")
# What an #SBATCH value may hold bare; anything else is quoted for sbatch's own line parser.
_BARE = re.compile(r"[\w.,:+=@%/-]+")


def time_limit_seconds(time: str) -> Optional[int]:
    """The seconds of an sbatch ``--time`` value, rounded up to whole minutes as SLURM does (None:
    no limit, ``0``/``INFINITE``/``UNLIMITED``); ``ValueError`` for a format sbatch does not accept."""
    text = time
    if text.lower() in _NO_LIMIT:
        return None
    m = _TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{time!r} is not a SLURM time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
                         "(e.g. 24:00:00 or 1-12), or INFINITE")
    g = {k: int(v) if v is not None else 0 for k, v in m.groupdict().items()}
    if m.group("days") is not None:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    elif m.group("c") is not None:
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:
        seconds = g["a"] * 60 + g["b"]  # minutes, or minutes:seconds
    return None if seconds == 0 else -(-seconds // 60) * 60


def sbatch_value(value: str, what: str) -> str:
    """``value`` as sbatch reads it back from an ``#SBATCH --option=<value>`` line: bare when plain,
    else in double quotes with ``\\``, ``"`` and ``#`` escaped (sbatch splits the line at blanks, an
    unquoted ``#`` starts a comment, a backslash escapes the next character). A line break or other
    control character cannot be expressed on one line: ``ConfigError`` naming ``what``."""
    from megadistill.config import ConfigError

    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(f"{what}: {value!r} holds {', '.join(map(repr, bad))}, which an #SBATCH line cannot hold")
    if _BARE.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#") + '"'


def job_name(name: str, kind: str) -> str:
    """The SLURM job name of run ``name``'s ``kind`` job (train: the run's name). It becomes part of
    the job log's file name (``%x``), so it may not hold a ``/``: ``ConfigError`` naming ``name``."""
    from megadistill.config import ConfigError

    full = name if kind == "train" else f"{name}-{kind}"
    if not name.strip():
        raise ConfigError(f"name: {name!r} cannot be a SLURM job name: give the run a name (name=... as an override)")
    if "/" in name:
        raise ConfigError(f"name: {name!r} holds a '/', which would put the job log (%x-%j.out: the job name) in a "
                          "directory that does not exist: choose a name without it (name=... as an override)")
    sbatch_value(full, "name")
    return full


def check_job(job: Job) -> None:
    """Raise ``ConfigError`` naming the option for an impossible geometry or an option value sbatch
    would not accept."""
    from megadistill.config import ConfigError

    for name in ("nodes", "signal_seconds"):
        if getattr(job, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(job, name)}")
    if job.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0, got {job.gpus_per_node}")
    if job.tasks_per_node is not None and job.tasks_per_node < 1:
        raise ConfigError(f"--tasks-per-node must be >= 1, got {job.tasks_per_node}")
    if job.gpus_per_node and job.ntasks_per_node != job.gpus_per_node:
        raise ConfigError(f"--tasks-per-node {job.ntasks_per_node} with --gpus-per-node {job.gpus_per_node}: "
                          "the driver runs one task per GPU")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be >= 1, got {job.cpus_per_task}")
    if job.array is not None and job.array < 1:
        raise ConfigError(f"--array must be >= 1 (tasks in the job array), got {job.array}")
    for name in ("partition", "account", "time"):
        if getattr(job, name) is not None:
            sbatch_value(getattr(job, name), f"--{name}")
    if job.time is not None:
        try:
            limit = time_limit_seconds(job.time)
        except ValueError as e:
            raise ConfigError(f"--time: {e}") from None
        if limit is not None and limit <= job.signal_seconds:
            raise ConfigError(f"--time {job.time} ({limit} s, in whole minutes) is not longer than --signal-seconds "
                              f"{job.signal_seconds}: the stop signal would come as the job starts; lower "
                              "--signal-seconds or raise --time")


def render(kind: str, config_path: str, job: Job, *, overrides: Sequence[str] = (), command_line: str = "") -> str:
    """The sbatch script (text) running ``megadistill <subcommand> config_path overrides`` as ``job``.

    The run file is loaded and its layout checked against the job's world size first (``ConfigError``
    naming the key otherwise), without the data preflight: the files may live on the cluster only.
    ``command_line`` is quoted in the script's header (how to render it again)."""
    from megadistill.config import ConfigError, load_config

    if kind not in KINDS:
        raise ConfigError(f"unknown template {kind!r}: one of {', '.join(KINDS)}")
    check_job(job)
    if job.array is not None and kind != "precompute":
        raise ConfigError(f"--array is for --kind precompute (a job array over the store's shards), not {kind}")
    cfg = load_config(config_path, list(overrides), world_size=job.world_size)
    sub = KINDS[kind][0]
    name = job_name(cfg.name, kind)
    log_dir = Path(cfg.output_dir) / "slurm"
    for what, value in (("config file", config_path), ("output_dir", cfg.output_dir)):
        sbatch_value(value, what)  # no line break, which would end a comment line of the script
    if "\\" in cfg.output_dir:
        raise ConfigError(f"output_dir: {cfg.output_dir!r} holds a backslash, which turns off SLURM's %x/%j in the job "
                          "log's file name (--output): choose a directory without it")
    # An array task's own job id (%j) differs from the array's (%A): name logs by array and task.
    log_name = "%x-%A_%a.out" if job.array else "%x-%j.out"
    # SLURM expands %-symbols in the log's whole path: a % of the directory is written %%.
    log_pattern = f"{str(log_dir).replace('%', '%%')}/{log_name}"
    q = shlex.quote
    tasks, world = job.ntasks_per_node, job.world_size
    lines = [
        "#!/bin/bash",
        f"# megadistill {sub} of run {cfg.name!r} ({config_path}) on SLURM: {job.nodes} node(s) x {tasks} task(s)"
        f" = {world} rank(s), {'one GPU per task' if job.gpus_per_node else 'CPU tasks, no GPU'}.",
        f"# Rendered by: {command_line or f'megadistill slurm render {config_path}'}",
        "# Re-render after changing the run file or the job's size rather than editing the #SBATCH lines.",
        "# Submit from the directory the run file's relative paths start from:",
        f"#   sbatch {KINDS[kind][1]} [section.key=value ...]",
        f"# Log: {log_dir}/<job name>-{'<array job id>_<task>' if job.array else '<job id>'}.out (appended to across "
        "requeues; the directory must exist:",
        "# `megadistill slurm render` creates it).",
        f"#SBATCH --job-name={sbatch_value(name, 'name')}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task is not None:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    for option in ("partition", "time", "account"):
        if getattr(job, option):
            lines.append(f"#SBATCH --{option}={sbatch_value(getattr(job, option), '--' + option)}")
    if job.array:
        from megadistill.store.format import DEFAULT_SAMPLES_PER_SHARD

        shards = -(-cfg.training.train_steps * cfg.data.global_batch_size // DEFAULT_SAMPLES_PER_SHARD)
        lines += [
            f"# A job array of {job.array} task(s): task t computes shards t, t+{job.array}, ... of the store's {shards} "
            f"(at the default {DEFAULT_SAMPLES_PER_SHARD} samples",
            "# per shard), dealt to its ranks one shard each; the task completing the set writes the manifest.",
            f"#SBATCH --array=0-{job.array - 1}",
        ]
    lines += [
        f"# USR1 to this shell {job.signal_seconds} s before the time limit (see the trap below).",
        f"#SBATCH --signal=B:USR1@{job.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={sbatch_value(log_pattern, 'output_dir')}",
        "set -uo pipefail",
        "",
        "# A RANK/WORLD_SIZE/MASTER_* exported in the submitting shell would reach every task: the job's",
        "# own values come from SLURM (the driver reads SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID).",
        "unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK TORCHELASTIC_RUN_ID MASTER_ADDR MASTER_PORT",
        "# Rendezvous on the first node; the port from the job id, so that jobs sharing a node differ.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}',
        "# A hung or failed collective raises instead of blocking until the time limit.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "# On hosts with several network interfaces, name the one the nodes share, e.g.:",
        "#   export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0",
        'echo "megadistill: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"',
        "",
        f"srun --kill-on-bad-exit=1 {q(job.python)} -m megadistill {sub} {q(config_path)} "
        + "".join(f"{q(o)} " for o in overrides) + '--no-progress "$@" &',
        "pid=$!",
    ]
    if kind == "train":
        lines += [
            "# The time limit is near: the tasks finish their step, save and exit with "
            f"{EXIT_STOPPED}; then the job is requeued.",
            "# (scancel sends SIGTERM to the tasks themselves: the same stop, and no requeue.)",
            "stop=",
            'trap \'stop=USR1; echo "megadistill: SIGUSR1 (time limit near): stopping at the end of this step"; '
            'kill -USR1 "$pid"\' USR1',
            "trap 'kill -TERM \"$pid\"' TERM",
        ]
    else:
        lines += [
            f"# {sub} resumes where it was stopped: near the time limit, the job is simply requeued.",
            "stop=",
            "trap 'stop=USR1; kill -TERM \"$pid\"' USR1",
            "trap 'kill -TERM \"$pid\"' TERM",
        ]
    lines += [
        "# wait returns early when a trapped signal arrives; srun may still be running then.",
        'while :; do wait "$pid"; status=$?; kill -0 "$pid" 2>/dev/null || break; done',
        'echo "megadistill: srun exited with status $status, $(date -u +%FT%TZ)"',
    ]
    if kind == "train":
        lines.append(f'if [ "$stop" = USR1 ] && [ "$status" -eq {EXIT_STOPPED} ]; then')
    else:
        lines.append('if [ "$stop" = USR1 ]; then')
    lines += [
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def write(kind: str, config_path: str, job: Job, out: Optional[str] = None, *, overrides: Sequence[str] = (),
          command_line: str = "", create_log_dir: bool = True) -> tuple[str, Path]:
    """Render and write the script (default file: ``<output_dir>/slurm/<kind>.sbatch``); creates the
    log directory (SLURM does not, and a job whose log cannot be opened fails without a trace).
    Refuses to overwrite a file that is not a rendered script. Returns (text, path)."""
    from megadistill.config import ConfigError, load_config

    text = render(kind, config_path, job, overrides=overrides, command_line=command_line)
    cfg = load_config(config_path, list(overrides), world_size=job.world_size)
    log_dir = Path(cfg.output_dir) / "slurm"
    path = Path(out) if out else log_dir / KINDS[kind][1]
    # Every place written to is checked before anything is: no log directory is left behind by a
    # script that cannot be written.
    where = f"--output {path}" if out else f"output_dir {cfg.output_dir}"
    if path.is_dir():
        raise ConfigError(f"{where}: a directory, not a file: give the script's file name (e.g. {path / KINDS[kind][1]})")
    _check_directory(path.parent, where)
    if create_log_dir:
        _check_directory(log_dir, f"output_dir {cfg.output_dir}")
    if path.exists() and "megadistill slurm render" not in path.read_text(errors="replace"):
        raise ConfigError(f"{path} exists and was not rendered by megadistill slurm render: not overwriting it")
    if create_log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomically: a job submitted meanwhile reads the old script or the new one, never half of one.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return text, path


def _check_directory(directory: Path, what: str) -> None:
    """``ConfigError`` naming ``what`` (the option or key the directory comes from) unless files can
    be created in ``directory``: it is a writable directory, or the nearest part of it that exists is
    one (the rest is created)."""
    from megadistill.config import ConfigError

    existing = next(d for d in (directory, *directory.parents) if d.exists() or d.is_symlink())
    if not existing.is_dir():
        raise ConfigError(f"{what}: cannot create {directory}: {existing} is {'a file' if existing.is_file() else 'not a directory'}")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == directory:
            raise ConfigError(f"{what}: cannot write to {directory}: permission denied")
        raise ConfigError(f"{what}: cannot create {directory}: {existing} is not writable (permission denied)")


EXAMPLES = {
    # file in slurm/ -> (template, run file, overrides, job): the checked-in examples, kept in sync by a
    # test. The example run files are toy-sized: a smaller micro-batch gives every GPU a share.
    "train.sbatch": ("train", "examples/pd_online.yaml", ("data.micro_batch_size=1",),
                     Job(nodes=2, gpus_per_node=8, cpus_per_task=8, time="24:00:00")),
    # One GPU per array task: a task deals its shards to its ranks, so a task of many GPUs wants many shards.
    "precompute.sbatch": ("precompute", "examples/pd_offline.yaml", ("data.micro_batch_size=2",),
                          Job(nodes=1, gpus_per_node=1, cpus_per_task=8, time="12:00:00", array=5)),
    "score.sbatch": ("score", "examples/salt_ds.yaml", ("data.micro_batch_size=2",),
                     Job(nodes=1, gpus_per_node=8, cpus_per_task=8, time="4:00:00")),
}


def example_command(name: str) -> str:
    """The command line that renders the checked-in example ``slurm/<name>``."""
    kind, config, overrides, job = EXAMPLES[name]
    parts = ["megadistill", "slurm", "render", config, *overrides, "--kind", kind, "--nodes", str(job.nodes),
             "--gpus-per-node", str(job.gpus_per_node)]
    if job.cpus_per_task is not None:
        parts += ["--cpus-per-task", str(job.cpus_per_task)]
    if job.time:
        parts += ["--time", job.time]
    if job.array is not None:
        parts += ["--array", str(job.array)]
    return " ".join(parts + ["-o", f"slurm/{name}"])


def render_example(name: str) -> str:
    """The text of the checked-in example ``slurm/<name>`` as the current code renders it (run from
    the repository's root: the run files are given relative to it)."""
    kind, config, overrides, job = EXAMPLES[name]
    return render(kind, config, job, overrides=overrides, command_line=example_command(name))
