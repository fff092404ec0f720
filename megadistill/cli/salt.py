"""SALT_DS's subcommand: ``megadistill score-data run.yaml`` (added to the ``megadistill`` parser by
``megadistill.cli.build_parser`` through :func:`add_commands`)."""

from __future__ import annotations


def _score(args) -> int:
    from megadistill import launch, preflight
    from megadistill.config import load_config

    where = launch.resolve()
    # The full preflight would demand the score file this command is about to write.
    cfg = load_config(args.config, args.overrides, world_size=where.world_size)
    preflight.check_teacher_job(cfg, "data_selection.scores", "the sequence scores")
    launch.choose_backend()
    from megadistill.salt.score import score_data

    manifest = score_data(cfg, progress=not args.no_progress, samples_per_part=args.samples_per_part)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:  # one report per job, not per rank
        return 0
    summary = manifest["summary"]
    from megadistill.salt.selection import selection_for_run

    print(f"wrote {cfg.data_selection.scores}: {summary['samples']} samples scored, "
          f"{summary['with_learnable_tokens']} with learnable tokens (top-{cfg.data_selection.top_k}); "
          f"histogram {cfg.data_selection.scores}/histogram.png")
    chosen = selection_for_run(cfg)  # a selection that picks nothing is an error here, the scores stay
    print(f"{chosen.selectable} selectable (>= {cfg.data_selection.min_learnable_tokens} learnable tokens); "
          f"selected {chosen.indices.size} ({chosen.describe()})")
    return 0


def add_commands(sub) -> None:
    """Add ``score-data`` to the subparsers ``sub``."""
    from megadistill.salt.scorefile import DEFAULT_SAMPLES_PER_PART

    p = sub.add_parser(
        "score-data",
        help="SALT_DS: score a run's training sequences with the small teacher (data_selection.scores)",
        description=(
            "Build the run's training data as training does, load teacher.model from teacher.checkpoint and "
            "score samples 0 .. train_steps x global_batch_size - 1: the median teacher loss over the tokens "
            "whose target is in the teacher's top data_selection.top_k. Writes data_selection.scores (arrays, "
            "manifest with checksums and the run's identity, histogram.png with the selection band). Data-, "
            "tensor- and pipeline-parallel under torchrun/srun; a killed run resumes where it stopped; on finished scores it "
            "only redraws the histogram for the current selection settings."
        ),
    )
    p.add_argument("config", help="run YAML file (the SALT run: teacher.*, data_selection.*, data, training)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data_selection.scores=/data/scores")
    p.add_argument("--samples-per-part", type=int, default=DEFAULT_SAMPLES_PER_PART, metavar="N",
                   help=f"samples per resumable part (default {DEFAULT_SAMPLES_PER_PART})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_score)
