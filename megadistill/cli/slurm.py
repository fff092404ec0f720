"""``megadistill slurm render``: an sbatch script for a run."""

from __future__ import annotations

import shlex

from megadistill.slurm import KINDS, Job, write


def add_commands(sub) -> None:
    """Add ``slurm render`` to the ``megadistill`` subparsers ``sub``."""
    s = sub.add_parser("slurm", help="SLURM job scripts for a run (slurm render RUN_YAML ...)")
    ssub = s.add_subparsers(dest="slurm_command", required=True, metavar="render")
    r = ssub.add_parser(
        "render",
        help="write an sbatch script for a run: one task per GPU, graceful stop before the time limit, requeue",
        description=(
            "Write an sbatch script for RUN_YAML (default file <output_dir>/slurm/<kind>.sbatch): one task per GPU, "
            "SIGUSR1 before the time limit turned into a checkpoint and a requeue, the log appended to under "
            "<output_dir>/slurm/, the rendezvous on the first node with a port from the job id, and inherited "
            "RANK/WORLD_SIZE/MASTER_* cleared. The layout is checked against nodes x tasks per node first."
        ),
    )
    r.add_argument("config", help="run YAML file (as the job will see it: relative to the submit directory)")
    r.add_argument("overrides", nargs="*", help="dotted overrides baked into the script, e.g. parallel.tensor_model_parallel_size=8")
    r.add_argument("--kind", choices=tuple(KINDS), default="train",
                   help="train (default), precompute (precompute-logits) or score (score-data)")
    r.add_argument("--nodes", type=int, required=True)
    r.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one task each (0: CPU tasks, no gres)")
    r.add_argument("--tasks-per-node", type=int, default=None, help="with --gpus-per-node 0: CPU tasks per node (default 1)")
    r.add_argument("--cpus-per-task", type=int, default=None)
    r.add_argument("--partition", default=None)
    r.add_argument("--time", default=None,
                   help="time limit as sbatch takes it: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
                        "(e.g. 24:00:00), or INFINITE; longer than --signal-seconds")
    r.add_argument("--account", default=None)
    r.add_argument("--signal-seconds", type=int, default=Job.signal_seconds,
                   help=f"USR1 this long before the time limit (default {Job.signal_seconds})")
    r.add_argument("--python", default="python", help="interpreter on the nodes (default: python on PATH)")
    r.add_argument("--array", type=int, default=None, metavar="N",
                   help="--kind precompute: a job array of N tasks, each computing every N-th shard of the store")
    r.add_argument("-o", "--output", default=None,
                   help="script file (default <output_dir>/slurm/<kind>.sbatch); its directory is created if need be")
    r.set_defaults(fn=_render_command)


def _render_command(args) -> int:
    import sys

    job = Job(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
              cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time, account=args.account,
              signal_seconds=args.signal_seconds, python=args.python, array=args.array)
    command = " ".join(["megadistill"] + [shlex.quote(a) for a in sys.argv[1:]]) if sys.argv[1:2] == ["slurm"] else ""
    _, path = write(args.kind, args.config, job, args.output, overrides=args.overrides, command_line=command)
    tasks = f" per array task, {job.array} array task(s)" if job.array else ""
    print(f"wrote {path}: {job.nodes} node(s) x {job.ntasks_per_node} task(s){tasks}; submit with: sbatch {path}")
    return 0
