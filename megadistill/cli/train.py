"""``megadistill train``: one YAML-configured run under torchrun, srun or as one process."""

from __future__ import annotations

from megadistill import launch
from megadistill.config import load_config
from megadistill.preemption import EXIT_STOPPED
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


def add_commands(sub) -> None:
    """Add ``train`` to the ``megadistill`` subparsers ``sub``."""
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
