"""The ``megadistill`` command line: train, preprocess, config, demo."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from megadistill.config import load_config
    from megadistill.train import run

    cfg = load_config(args.config, args.overrides)  # validated before any process group starts
    result = run(cfg, progress=not args.no_progress)
    return 0 if result.steps == cfg.training.train_steps else 1


def _preprocess(args) -> int:
    from megadistill.data import preprocess

    r = preprocess(args.input or None, args.output_prefix, vocab_size=args.vocab_size,
                   tokenizer_model=args.tokenizer_model, json_key=args.json_key)
    print(f"wrote {r.prefix}.bin/.idx: {r.num_documents} documents, {r.num_tokens} tokens; tokenizer {r.tokenizer_model}")
    return 0


def _config(args) -> int:
    from megadistill.config import explain, load_config, to_dict

    if args.explain:
        print(explain(markdown=args.markdown), end="")
        return 0
    import yaml

    cfg = load_config(args.file, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _demo(args) -> int:
    from megadistill.demo import run_demo

    run_demo(args.output_dir, teacher_steps=args.teacher_steps, student_steps=args.student_steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megadistill", description="Knowledge distillation for LLM pre-training on Megatron-core.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train per a YAML run file (under torchrun/srun for several ranks)")
    t.add_argument("config", help="run YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kd.temperature=2.0")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)
    pr = sub.add_parser("preprocess", help="text/JSONL files -> sentencepiece tokenizer + Megatron .bin/.idx")
    pr.add_argument("--input", nargs="*", help="text (.txt) or JSON-lines (.jsonl) files (default: the embedded corpus)")
    pr.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx and the tokenizer beside it")
    pr.add_argument("--vocab-size", type=int, default=2048)
    pr.add_argument("--tokenizer-model", default=None, help="use this sentencepiece model instead of training one")
    pr.add_argument("--json-key", default="text")
    pr.set_defaults(fn=_preprocess)
    c = sub.add_parser("config", help="print the validated config, or --explain every key")
    c.add_argument("file", nargs="?", default=None)
    c.add_argument("overrides", nargs="*")
    c.add_argument("--explain", action="store_true", help="describe every config key")
    c.add_argument("--markdown", action="store_true", help="with --explain: a markdown reference")
    c.set_defaults(fn=_config)
    d = sub.add_parser("demo", help="teacher, KD student and baseline on the embedded corpus (CPU, minutes)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--teacher-steps", type=int, default=320)
    d.add_argument("--student-steps", type=int, default=300)
    d.set_defaults(fn=_demo)
    return p


def _quiet_known_warnings() -> None:
    import warnings

    # torch's checkpoint planner warns on every save/load about its own ShardedTensor; Megatron
    # warns that GPU-only accelerators (Transformer Engine, Apex) are absent, which on a CPU
    # machine is expected.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    args = build_parser().parse_args(argv)
    from megadistill.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"megadistill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
