"""``megadistill export-hf``: a student checkpoint -> a Hugging Face model directory (added to the
``megadistill`` parser by ``megadistill.cli.build_parser`` through :func:`add_commands`)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _bytes(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes (0 for anything else: refused by the export)."""
    m = _SIZE.match(text)
    if not m:
        return 0
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _export(args) -> int:
    from megadistill.data.errors import DataError
    from megadistill.hf.errors import ExportError
    from megadistill.hf.export import export

    size = _bytes(args.max_shard_size)
    if size < 1:
        raise ExportError(f"--max-shard-size {args.max_shard_size!r} is not a size (e.g. 5GB, 500MB)")
    try:
        result = export(args.path, args.output, model_type=args.model_type, dtype=args.dtype, tokenizer=args.tokenizer,
                        tokenizer_type=args.tokenizer_type, max_shard_bytes=size)
    except DataError as e:  # the tokenizer
        raise ExportError(str(e)) from e
    c = result.checkpoint
    print(f"exported {c.path} (step {c.step}, {c.backend} backend) as {result.architecture.model_type} "
          f"({result.dtype}, {result.vocab_size} vocabulary rows of {result.padded_rows}; tokenizer "
          f"{'wrapped from sentencepiece' if result.tokenizer_kind == 'sentencepiece' else 'copied'}) to {result.output}")
    return 0


def add_commands(sub) -> None:
    """Add ``export-hf`` to the ``megadistill`` subparsers ``sub``."""
    from megadistill.hf.hf_config import EXPORT_MODEL_TYPES

    c = sub.add_parser(
        "export-hf",
        help="student checkpoint (either backend) -> Hugging Face model directory (config.json, safetensors, tokenizer)",
        description=(
            "Read a student checkpoint written by either backend (Megatron at any TP/PP, DeepSpeed at any ZeRO stage) "
            "and write a Hugging Face model directory: config.json, model.safetensors (sharded) with its index, "
            "generation_config.json, the run's tokenizer (a Hugging Face tokenizer copied, a sentencepiece model "
            "wrapped so that AutoTokenizer loads it and encodes as training did) and megadistill_export.json (the "
            "run, step and checkpoint content hash it came from). The architecture is the Hugging Face one that "
            "computes the student exactly: starcoder2 for the default LayerNorm/GeLU student, llama (or qwen2, qwen3, "
            "mistral) for RMSNorm/SwiGLU ones; a student none expresses is refused naming the model keys. OUTPUT "
            "must be new or empty; it is written atomically."
        ),
    )
    c.add_argument("path", help="a run directory (its newest complete checkpoint) or one step_* checkpoint directory "
                                "(a convert-hf output too)")
    c.add_argument("--output", required=True, help="the Hugging Face model directory to write: new or empty")
    c.add_argument("--model-type", choices=EXPORT_MODEL_TYPES, default=None,
                   help="the Hugging Face architecture (default: starcoder2 for LayerNorm students; qwen3 with "
                        "qk_layernorm, qwen2 with query/key/value biases only, else llama)")
    c.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the written weights (default: the model's precision, fp32 when it has none)")
    c.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer, where the checkpoint's record does not lead to it (it must be the one "
                        "the checkpoint records)")
    c.add_argument("--tokenizer-type", choices=("sentencepiece", "huggingface"), default=None,
                   help="how to read --tokenizer (default: huggingface for a directory or .json file)")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB (default), 500MB")
    c.set_defaults(fn=_export)
