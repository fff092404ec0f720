"""Every ``megadistill`` command line, one module per group of commands:

- :mod:`~megadistill.cli.train`: ``train``, and ``torchrun`` (torchrun that forwards the stop signals
  to its workers and exits 75 after a graceful stop);
- :mod:`~megadistill.cli.config`: ``config`` (check, print, ``--explain``);
- :mod:`~megadistill.cli.data`: ``preprocess``, ``data verify``;
- :mod:`~megadistill.cli.store`: ``precompute-logits``, ``store info|verify``;
- :mod:`~megadistill.cli.salt`: ``score-data`` (SALT_DS);
- :mod:`~megadistill.cli.hf`: ``convert-hf``;
- :mod:`~megadistill.cli.export_hf`: ``export-hf``;
- :mod:`~megadistill.cli.plan`: ``plan``;
- :mod:`~megadistill.cli.slurm`: ``slurm render``;
- :mod:`~megadistill.cli.demo`: ``demo``.

The top floor of the package: a command loads its config (``megadistill.config``), runs the
preflight checks it needs (``megadistill.preflight``), then the work. Each module imports what its
commands need inside them, so ``megadistill --help`` and ``megadistill config`` start without
megatron-core. Errors a user can fix are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from megadistill.checkpoint_dir import CorruptCheckpointError
from megadistill.cli import config, data, demo, export_hf, hf, plan, salt, slurm, store, train
from megadistill.config import ConfigError
from megadistill.data.errors import DataError
from megadistill.launch import LaunchError
from megadistill.store.format import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megadistill", description="Knowledge distillation for LLM pre-training on Megatron-core.")
    sub = p.add_subparsers(dest="command", required=True)
    for commands in (train, data, config, demo, store, salt, slurm, hf, export_hf, plan):
        commands.add_commands(sub)
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
    # megatron-core 0.19's repeated notices a user cannot act on (GPTModel's deprecation, DDP's
    # parameter layout, the async-save path); no megatron import here.
    from megadistill import _compat

    _compat.quiet_known_messages()


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
    try:
        return args.fn(args)
    # OSError: a file or directory the command needed (missing, unreadable, a full disk), named by the error.
    except (ConfigError, DataError, LaunchError, OSError, CorruptCheckpointError, StoreError) as e:
        print(f"megadistill: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged: stopped before a bad checkpoint
        print(f"megadistill: training stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
