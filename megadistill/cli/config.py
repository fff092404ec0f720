"""``megadistill config``: check a run file for a world size and print it, or ``--explain`` every key."""

from __future__ import annotations

import argparse

from megadistill import launch
from megadistill.config import ConfigError, accepted_world_sizes, explain, load_config, model_parallel_size, to_dict
from megadistill.preflight import preflight


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _planned_world_size(args) -> tuple[int | None, str]:
    """The world size ``config`` checks against, and where it comes from: --world-size, or
    --nproc-per-node x --nnodes, or the launch environment when run under torchrun/srun; else
    None (unknown: the layout is reported instead of rejected)."""
    if args.world_size is not None:
        if args.nproc_per_node is not None or args.nnodes is not None:
            raise ConfigError("give either --world-size or --nproc-per-node [--nnodes], not both")
        return args.world_size, "--world-size"
    if args.nproc_per_node is not None:
        nnodes = args.nnodes or 1
        return args.nproc_per_node * nnodes, f"--nproc-per-node {args.nproc_per_node} x --nnodes {nnodes}"
    if args.nnodes is not None:
        raise ConfigError("--nnodes needs --nproc-per-node (processes per node)")
    try:
        where = launch.resolve()
    except launch.LaunchError as e:
        return None, f"not a launch here ({e})"
    if where.source == "single":
        return None, "not under a launcher"
    return where.world_size, f"the {where.source} environment"


def _layout_report(cfg, world_size: int | None, origin: str) -> list[str]:
    par, d = cfg.parallel, cfg.data
    shape = f"TP {par.tensor_model_parallel_size} x PP {par.pipeline_model_parallel_size}"
    if world_size is not None:
        dp = world_size // model_parallel_size(cfg)
        micro = d.global_batch_size // (d.micro_batch_size * dp)
        return [
            f"world size {world_size} (from {origin}) = {shape} x DP {dp}: valid",
            f"each data-parallel rank runs {micro} micro-batch(es) of {d.micro_batch_size} sequences per step",
        ]
    sizes = accepted_world_sizes(cfg)
    shown = ", ".join(map(str, sizes[:12])) + (", ..." if len(sizes) > 12 else "")
    return [
        f"world size unknown ({origin}): checked the layout without it",
        f"{shape} = {model_parallel_size(cfg)} ranks per model copy; world sizes accepted "
        f"(data-parallel size dividing global_batch_size / micro_batch_size = "
        f"{d.global_batch_size // d.micro_batch_size}): {shown}",
        "check one with --world-size N (or --nproc-per-node P --nnodes M)",
    ]


def _config(args) -> int:
    if args.explain:
        print(explain(markdown=args.markdown), end="")
        return 0
    import yaml

    world_size, origin = _planned_world_size(args)
    cfg = load_config(args.file, args.overrides, world_size=world_size)
    if not args.schema_only:
        preflight(cfg)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    # YAML comments: the output stays a loadable run file.
    for line in _layout_report(cfg, world_size, origin):
        print(f"# {line}")
    if args.schema_only:
        print("# --schema-only: data files, tokenizer and teacher checkpoint not checked")
    return 0


def add_commands(sub) -> None:
    """Add ``config`` to the ``megadistill`` subparsers ``sub``."""
    c = sub.add_parser(
        "config",
        help="check a run file for a world size and print it, or --explain every key",
        description=(
            "Check a run file (with overrides) and print the resolved config as YAML, followed by a "
            "comment on the parallel layout. The layout is checked against the world size from "
            "--world-size, or --nproc-per-node x --nnodes, or else the launch environment when run "
            "under torchrun/srun. With none of them (a login node, a laptop) the world size is unknown: "
            "everything else is checked, nothing is rejected for want of ranks, and the world sizes the "
            "layout accepts are listed (TP x PP x DP, DP dividing global_batch_size / micro_batch_size)."
        ),
    )
    c.add_argument("file", nargs="?", default=None, help="run YAML file (default: all defaults)")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=2")
    c.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                   help="check the layout for N ranks in all (TP x PP must divide N; global batch by micro-batch x DP)")
    c.add_argument("--nproc-per-node", type=_positive_int, default=None, metavar="P",
                   help="with --nnodes: check for P x M ranks, as torchrun --nproc-per-node P --nnodes M would start")
    c.add_argument("--nnodes", type=_positive_int, default=None, metavar="M", help="nodes (default 1)")
    c.add_argument("--schema-only", action="store_true",
                   help="check the config alone: skip data files, tokenizer and teacher checkpoint (e.g. away from the cluster)")
    c.add_argument("--explain", action="store_true", help="describe every config key")
    c.add_argument("--markdown", action="store_true", help="with --explain: a markdown reference")
    c.set_defaults(fn=_config)
