"""The store's subcommands: ``precompute-logits`` and ``store info|verify`` (added to the
``megadistill`` parser by ``megadistill.cli.build_parser`` through :func:`add_commands`)."""

from __future__ import annotations



def _temperature_list(text: str) -> list[float]:
    """``--temperatures 1,2,4`` → ``[1.0, 2.0, 4.0]`` (checked further by ``store_temperatures``)."""
    import argparse

    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,2,4") from None


def _precompute(args) -> int:
    from megadistill import launch, preflight
    from megadistill.config import ConfigError, load_config
    from megadistill.store.format import StoreError

    where = launch.resolve()
    # The full preflight would demand the store this command is about to write.
    cfg = load_config(args.config, args.overrides, world_size=where.world_size)
    preflight.check_teacher_job(cfg, "teacher.store", "the logits store")
    launch.choose_backend()
    from megadistill.store.precompute import precompute, shard_task_from_env

    # Inside a SLURM job array each task takes its share of the shards unless told otherwise.
    env_task, env_tasks = shard_task_from_env()
    task = env_task if args.shard_task is None else args.shard_task
    tasks = env_tasks if args.shard_tasks is None else args.shard_tasks
    try:
        manifest = precompute(cfg, progress=not args.no_progress, samples_per_shard=args.samples_per_shard,
                              logprob_dtype=args.logprob_dtype, kind=args.format, draws=args.draws,
                              compression="zstd" if args.zstd else None, shard_task=task, shard_tasks=tasks,
                              temperatures=args.temperatures)
    except StoreError as e:
        raise ConfigError(str(e)) from e
    if manifest is None:
        if where.rank == 0:
            print(f"{cfg.teacher.store}: shard task {task} of {tasks} done; the store is incomplete until the other "
                  "tasks finish (the last one writes manifest.json)")
        return 0
    tokens = manifest["num_samples"] * manifest["identity"]["dataset"]["seq_length"]
    print(f"wrote {cfg.teacher.store}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards, "
          f"{manifest['total_bytes'] / max(tokens, 1):.1f} bytes/token")
    return 0


def _info(args) -> int:
    from megadistill.config import ConfigError
    from megadistill.store.format import StoreError
    from megadistill.store.inspect_store import info

    try:
        lines = info(args.path)
    except StoreError as e:
        raise ConfigError(str(e)) from e
    print("\n".join(lines))
    return 0


def _verify(args) -> int:
    from megadistill.config import ConfigError
    from megadistill.store.format import StoreError
    from megadistill.store.inspect_store import run_dataset, verify

    try:
        lines = verify(args.path, run_dataset(args.data) if args.data else None)
    except StoreError as e:
        raise ConfigError(str(e)) from e
    print("\n".join(lines))
    return 0


def add_commands(sub) -> None:
    """Add ``precompute-logits`` and ``store {info,verify}`` to the subparsers ``sub``."""
    from megadistill.store.format import DEFAULT_SAMPLES_PER_SHARD

    p = sub.add_parser(
        "precompute-logits",
        help="run the teacher over a run's training samples once and write a logits store (teacher.store)",
        description=(
            "Build the run's training data as training does, load teacher.model from teacher.checkpoint and "
            "write the top-p-k targets (kd.top_p, kd.top_k) or RS-KD draws (--format rskd) of samples 0 .. train_steps x global_batch_size - 1 "
            "to teacher.store. Data- and tensor-parallel under torchrun/srun; a killed run resumes where it stopped; "
            "--shard-tasks splits the shards over independent jobs (a SLURM job array)."
        ),
    )
    p.add_argument("config", help="run YAML file (the student's run: teacher.*, kd.top_p/top_k, data, training)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.store=/data/store")
    p.add_argument("--logprob-dtype", choices=("fp16", "fp32", "qlog64", "qlog16"), default="fp16",
                   help="log-prob encoding: fp16 (default, rounds down by < 1 ulp), fp32 (exact), or qlog64/qlog16 "
                        "(a log grid of 1/64 or 1/16 nat, one byte per entry before --zstd; |error| <= the step; "
                        "fp32 residuals)")
    p.add_argument("--zstd", action="store_true",
                   help="zstd-compress every section but the ids, per sample (lossless; with qlog64 the "
                        "smallest top-p-k store)")
    p.add_argument("--format", choices=("top_p_k", "rskd"), default="top_p_k",
                   help="top_p_k (default: kd.top_p/top_k ids, log-probs and residual) or rskd (random-sampling "
                        "KD: --draws samples per position from the teacher, stored as distinct ids with counts; "
                        "an unbiased target)")
    p.add_argument("--draws", type=int, default=12, metavar="N",
                   help="rskd: samples per position (default 12), seeded by training.seed")
    p.add_argument("--temperatures", type=_temperature_list, default=None, metavar="T1,T2,...",
                   help="top_p_k: also record the truncated ids' tempered mass at each temperature, which a student "
                        "with truncation ghost needs at that kd.temperature (4 bytes per token each; 1 is always "
                        "served); rskd: the one temperature the draws are made at. Default: the temperatures the "
                        "run's KD steps take (kd.temperature, kd.temperature_schedule)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD, metavar="N")
    p.add_argument("--shard-tasks", type=int, default=None, metavar="N",
                   help="split the shards over N independent jobs (shard i goes to task i mod N); default: "
                        "SLURM_ARRAY_TASK_COUNT in a job array, else 1. The task that completes the set writes "
                        "the manifest")
    p.add_argument("--shard-task", type=int, default=None, metavar="I",
                   help="this job's task, 0..N-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN in a job "
                        "array, else 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_precompute)
    s = sub.add_parser("store", help="inspect or check a logits store (store info|verify PATH)")
    ssub = s.add_subparsers(dest="store_command", required=True)
    i = ssub.add_parser("info", help="settings, the temperatures it serves, size, bytes/token and coverage of a store")
    i.add_argument("path")
    i.set_defaults(fn=_info)
    v = ssub.add_parser("verify", help="check the manifest's checksum, and every shard's checksum and contents (ids, "
                                       "log-probs, residuals, tempered tails) against the manifest (and, with --data, "
                                       "the dataset)")
    v.add_argument("path")
    v.add_argument("--data", metavar="RUN_YAML", default=None,
                   help="also check each sample's token hash against this run's training data")
    v.set_defaults(fn=_verify)
