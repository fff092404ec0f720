"""``megadistill demo``: both papers' comparisons on the embedded corpus, with a report."""

from __future__ import annotations

from megadistill.cli.config import _positive_int


def _demo(args) -> int:
    from megadistill.demo import run_demo

    out = args.output_dir or ("runs/demo-fast" if args.fast else "runs/demo")
    run_demo(out, scale=args.scale, seeds=args.seeds, inputs=args.inputs, fast=args.fast, progress=not args.no_progress)
    return 0


def add_commands(sub) -> None:
    """Add ``demo`` to the ``megadistill`` subparsers ``sub``."""
    d = sub.add_parser("demo", help="both papers' comparisons on the embedded corpus, with a report (2 CPU cores, 15-25 min)")
    d.add_argument("--output-dir", default=None, help="default runs/demo (runs/demo-fast with --fast)")
    d.add_argument("--fast", action="store_true", help="a smoke version in a few minutes (tiny models, no meaningful numbers)")
    d.add_argument("--seeds", type=_positive_int, default=1, metavar="N", help="repeat every main student run with N seeds (the truncation side by side runs max(N, 3))")
    d.add_argument("--inputs", nargs="+", default=None, metavar="FILE", help="your own .txt/.jsonl files instead of the embedded corpus")
    d.add_argument("--scale", type=float, default=1.0, metavar="S", help="steps x S and hidden sizes x sqrt(S)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (job logs)")
    d.set_defaults(fn=_demo)
