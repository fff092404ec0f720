"""``megadistill plan``: check a run file for nodes x GPUs per node, then print its plan."""

from __future__ import annotations

from megadistill.config import ConfigError, load_config
from megadistill.preflight import preflight
from megadistill.cli.config import _layout_report
from megadistill.plan.report import make_plan, parse_size, report


def _plan_command(args) -> int:
    """``megadistill plan``: check the run file for nodes x GPUs per node, then print the plan."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    world_size = args.nodes * args.gpus_per_node
    # The schema (layout included) for this world size; the run's files only with --check-files
    # (a plan is often made away from the cluster's data and checkpoints).
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    if args.check_files:
        preflight(cfg)
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    plan = make_plan(cfg, world_size, gpu_memory, kind=args.store_format, logprob_dtype=args.logprob_dtype,
                     draws=args.draws, zstd=True if args.zstd else None, samples_per_shard=args.samples_per_shard)
    print(f"{cfg.name}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), backend {cfg.optimizer.backend}, "
          f"teacher {cfg.teacher.mode}")
    origin = f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node}"
    for line in report(plan, _layout_report(cfg, world_size, origin)):
        print(line)
    return 0


def add_commands(sub) -> None:
    """Add ``plan`` to the ``megadistill`` subparsers ``sub``."""
    p = sub.add_parser(
        "plan",
        help="per-rank memory, teacher FLOP overhead, tokens per step and store size of a run, before launch",
        description=(
            "Check a run file's layout for NODES x GPUS_PER_NODE ranks, then print, without a GPU: the parameters "
            "of student and teacher (counted from the architecture), each pipeline stage's memory per rank "
            "(weights, gradients, optimizer state by backend, ZeRO stage and precision; activations without "
            "recomputation; logits), the teacher's FLOP overhead 1 + F_t/(3 F_s), tokens per step and, for offline "
            "or recording runs, the logits store's size. With --gpu-memory, warns for every stage whose ranks do not fit."
        ),
    )
    p.add_argument("config", help="run YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    p.add_argument("--nodes", type=int, required=True, metavar="N")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node, one rank each")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="memory of one GPU, e.g. 80GiB or 40GB: warn for ranks that would not fit")
    p.add_argument("--check-files", action="store_true",
                   help="also run the preflight checks of data, tokenizer, teacher checkpoint and store")
    g = p.add_argument_group("logits store (teacher.mode offline; default: the store's manifest if it exists, "
                             "else precompute-logits' defaults)")
    g.add_argument("--store-format", choices=("top_p_k", "rskd"), default=None, help="as precompute-logits --format")
    g.add_argument("--logprob-dtype", choices=("fp16", "fp32", "qlog64", "qlog16"), default=None)
    g.add_argument("--draws", type=int, default=None, metavar="N", help="rskd: samples per position")
    g.add_argument("--zstd", action="store_true", help="the store is zstd-compressed (size shown uncompressed)")
    g.add_argument("--samples-per-shard", type=int, default=None, metavar="N")
    p.set_defaults(fn=_plan_command)
