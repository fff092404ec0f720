"""The ``megadistill`` command line: train, preprocess, data verify, config, demo."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from megadistill import launch
    from megadistill.config import load_config

    # The launch decides the world size the config is checked against, before any process group
    # starts; a job given GPUs that torch cannot use stops here rather than training on gloo.
    where = launch.resolve()
    cfg = load_config(args.config, args.overrides, world_size=where.world_size)
    launch.choose_backend()
    from megadistill.train import run

    try:
        result = run(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    finally:
        _close_process_groups()
    if result.stopped_by is not None:
        from megadistill.preemption import EXIT_STOPPED

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


def _preprocess(args) -> int:
    from megadistill.data import preprocess

    r = preprocess(args.input or None, args.output_prefix, vocab_size=args.vocab_size,
                   tokenizer_model=args.tokenizer_model, json_key=args.json_key, tokenizer_type=args.tokenizer_type)
    print(f"wrote {r.prefix}.bin/.idx: {r.num_documents} documents, {r.num_tokens} tokens; tokenizer {r.tokenizer_model}")
    return 0


def _data_verify(args) -> int:
    from pathlib import Path

    from megadistill.data_integrity import verify

    prefix = args.prefix
    # "corpus.bin" or "corpus.idx" given for the prefix "corpus".
    if not Path(prefix + ".idx").exists() and Path(prefix).suffix in (".bin", ".idx"):
        prefix = str(Path(prefix).with_suffix(""))
    for line in verify(prefix, tokenizer_model=args.tokenizer_model).lines():
        print(line)
    return 0


def _planned_world_size(args) -> tuple[int | None, str]:
    """The world size ``config`` checks against, and where it comes from: --world-size, or
    --nproc-per-node x --nnodes, or the launch environment when run under torchrun/srun; else
    None (unknown: the layout is reported instead of rejected)."""
    from megadistill import launch
    from megadistill.config import ConfigError

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
    from megadistill.config import accepted_world_sizes, model_parallel_size

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
    from megadistill.config import explain, load_config, to_dict

    if args.explain:
        print(explain(markdown=args.markdown), end="")
        return 0
    import yaml

    world_size, origin = _planned_world_size(args)
    cfg = load_config(args.file, args.overrides, world_size=world_size, preflight=not args.schema_only)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    # YAML comments: the output stays a loadable run file.
    for line in _layout_report(cfg, world_size, origin):
        print(f"# {line}")
    if args.schema_only:
        print("# --schema-only: data files, tokenizer and teacher checkpoint not checked")
    return 0


def _demo(args) -> int:
    from megadistill.demo import run_demo

    out = args.output_dir or ("runs/demo-fast" if args.fast else "runs/demo")
    run_demo(out, scale=args.scale, seeds=args.seeds, inputs=args.inputs, fast=args.fast, progress=not args.no_progress)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megadistill", description="Knowledge distillation for LLM pre-training on Megatron-core.")
    sub = p.add_subparsers(dest="command", required=True)
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
    pr = sub.add_parser("preprocess", help="text/JSONL files -> sentencepiece tokenizer + Megatron .bin/.idx")
    pr.add_argument("--input", nargs="*", help="text (.txt) or JSON-lines (.jsonl) files (default: the embedded corpus)")
    pr.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx and the tokenizer beside it")
    pr.add_argument("--vocab-size", type=int, default=2048)
    pr.add_argument("--tokenizer-model", default=None, help="use this sentencepiece model instead of training one "
                    "(or with --tokenizer-type huggingface a tokenizer.json or Hugging Face tokenizer directory)")
    pr.add_argument("--tokenizer-type", choices=("sentencepiece", "huggingface"), default="sentencepiece",
                    help="how to read --tokenizer-model (default sentencepiece)")
    pr.add_argument("--json-key", default="text")
    pr.set_defaults(fn=_preprocess)
    dt = sub.add_parser("data", help="check preprocessed data (data verify PREFIX)")
    dsub = dt.add_subparsers(dest="data_command", metavar="verify", required=True)
    v = dsub.add_parser(
        "verify",
        help="full check of <prefix>.bin/.idx: structure, manifest checksums, token ids",
        description=(
            "Check <PREFIX>.bin/.idx in full: the index's structure against the .bin's size, the size and "
            "sha256 of every file <PREFIX>.manifest.json lists (written by megadistill preprocess), and every "
            "token id against the vocabulary of the tokenizer (<PREFIX>.model, or --tokenizer-model). "
            "Exit 0 if all is well, 2 with a message naming the damaged file otherwise."
        ),
    )
    v.add_argument("prefix", help="dataset prefix (the .bin/.idx file names without their suffix)")
    v.add_argument("--tokenizer-model", default=None,
                   help="check token ids against this tokenizer (a sentencepiece .model; a .json file or a directory "
                        "is read as a Hugging Face tokenizer)")
    v.set_defaults(fn=_data_verify)
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
    d = sub.add_parser("demo", help="both papers' comparisons on the embedded corpus, with a report (2 CPU cores, <= 20 min)")
    d.add_argument("--output-dir", default=None, help="default runs/demo (runs/demo-fast with --fast)")
    d.add_argument("--fast", action="store_true", help="a smoke version in a few minutes (tiny models, no meaningful numbers)")
    d.add_argument("--seeds", type=_positive_int, default=1, metavar="N", help="repeat every main student run with N seeds")
    d.add_argument("--inputs", nargs="+", default=None, metavar="FILE", help="your own .txt/.jsonl files instead of the embedded corpus")
    d.add_argument("--scale", type=float, default=1.0, metavar="S", help="steps x S and hidden sizes x sqrt(S)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (job logs)")
    d.set_defaults(fn=_demo)
    from megadistill.store.cli import _add_store_commands  # precompute-logits, store info|verify

    _add_store_commands(sub)
    from megadistill.salt.cli import _add_salt_commands  # score-data (SALT_DS)

    _add_salt_commands(sub)
    from megadistill.slurm import add_commands as _add_slurm_commands  # slurm render

    _add_slurm_commands(sub)
    from megadistill.hf.cli import add_commands as _add_hf_commands  # convert-hf

    _add_hf_commands(sub)
    from megadistill.plan import add_commands as _add_plan_commands  # plan (memory, FLOPs, store size)

    _add_plan_commands(sub)
    return p


def _quiet_known_warnings() -> None:
    import warnings

    # torch's checkpoint planner warns on every save/load about its own ShardedTensor; Megatron
    # warns that GPU-only accelerators (Transformer Engine, Apex) are absent, which on a CPU
    # machine is expected.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    # Deprecated collectives megatron-core calls (reduce_scatter_tensor, all_gather_into_tensor).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    # megatron-core's optimizer probes .grad of non-leaf tensors while it collects main grads.
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf", category=UserWarning)
    # megatron-core's TransformerConfig re-validates its own default cuda_graph_scope when copied.
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after a flag (`train run.yaml --no-progress kd.temperature=2`), which a
    # positional nargs="*" alone does not take.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from megadistill.checkpoint_dir import CorruptCheckpointError
    from megadistill.config import ConfigError
    from megadistill.data_checks import DataError
    from megadistill.launch import LaunchError
    from megadistill.store.format import StoreError

    try:
        return args.fn(args)
    except (ConfigError, DataError, LaunchError, FileNotFoundError, CorruptCheckpointError, StoreError) as e:
        print(f"megadistill: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: stopped before a bad checkpoint
        print(f"megadistill: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
