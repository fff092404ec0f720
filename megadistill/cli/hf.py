"""``megadistill convert-hf``: a Hugging Face checkpoint -> a teacher checkpoint and its YAML
(added to the ``megadistill`` parser by ``megadistill.cli.build_parser`` through :func:`add_commands`)."""

from __future__ import annotations


def _convert(args) -> int:
    from megadistill.data.errors import DataError
    from megadistill.hf.convert import convert
    from megadistill.hf.errors import ConversionError

    try:
        result = convert(args.path, args.output, model_type=args.model_type, tokenizer=args.tokenizer,
                         tokenizer_type=args.tokenizer_type, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                         dtype=args.dtype, overwrite=args.overwrite)
    except DataError as e:  # the tokenizer
        raise ConversionError(str(e)) from e
    if result.superseded is not None:
        print(f"moved the earlier contents of {args.output} aside to {result.superseded}")
    print(f"wrote {result.checkpoint} ({result.vocab_rows} vocabulary rows) and {result.snippet}:\n")
    print(result.snippet_text, end="")
    return 0


def add_commands(sub) -> None:
    """Add ``convert-hf`` to the ``megadistill`` subparsers ``sub``."""
    from megadistill.hf.architecture import MODEL_TYPES

    c = sub.add_parser(
        "convert-hf",
        help="Hugging Face Llama/Qwen2/Qwen3/Mistral checkpoint -> teacher checkpoint + teacher.model YAML",
        description=(
            "Read a Hugging Face checkpoint directory (config.json + safetensors, sharded or not) and write the "
            "equivalent megatron-core GPT model as a teacher checkpoint under OUTPUT (OUTPUT/step_00000000, loaded "
            "resharded at any TP/PP with teacher.checkpoint: OUTPUT), and OUTPUT/teacher.yaml: the teacher block and "
            "the data.tokenizer_* lines to merge into a run file. The student uses the teacher's tokenizer; the "
            "vocabulary is padded as a run with --make-vocab-size-divisible-by pads it at TP=1; a run at any TP loads it "
            "(padding rows added as zeros or dropped). "
            "An OUTPUT that already holds anything (an earlier conversion, even of the same model, or other files) is "
            "refused unless --overwrite is given."
        ),
    )
    c.add_argument("path", help="Hugging Face checkpoint directory (config.json, model.safetensors[.index.json])")
    c.add_argument("--output", required=True,
                   help="directory to write the teacher checkpoint and teacher.yaml to: new or empty (see --overwrite)")
    c.add_argument("--overwrite", action="store_true",
                   help="if OUTPUT holds an earlier conversion (of any model, the same one included) or other files, "
                        "move them aside into OUTPUT/superseded-<UTC time>/ first instead of refusing; nothing is deleted")
    c.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="the architecture (default: config.json's model_type)")
    c.add_argument("--tokenizer", default=None,
                   help="the tokenizer the student will use (default: the tokenizer.json or tokenizer.model in PATH)")
    c.add_argument("--tokenizer-type", choices=("sentencepiece", "huggingface"), default=None,
                   help="how to read --tokenizer (default: huggingface for a directory or .json file)")
    c.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="D",
                   help="the run's model.make_vocab_size_divisible_by (default 128)")
    c.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the written weights (default: config.json's dtype / torch_dtype, else fp32)")
    c.set_defaults(fn=_convert)

