"""``megadistill preprocess`` and ``megadistill data verify``."""

from __future__ import annotations

from pathlib import Path


def _preprocess(args) -> int:
    from megadistill.data.preprocess import preprocess  # megatron-core: only for this command

    r = preprocess(args.input or None, args.output_prefix, vocab_size=args.vocab_size,
                   tokenizer_model=args.tokenizer_model, json_key=args.json_key, tokenizer_type=args.tokenizer_type)
    print(f"wrote {r.prefix}.bin/.idx: {r.num_documents} documents, {r.num_tokens} tokens; tokenizer {r.tokenizer_model}")
    return 0


def _data_verify(args) -> int:
    from megadistill.data.integrity import verify

    prefix = args.prefix
    # "corpus.bin" or "corpus.idx" given for the prefix "corpus".
    if not Path(prefix + ".idx").exists() and Path(prefix).suffix in (".bin", ".idx"):
        prefix = str(Path(prefix).with_suffix(""))
    for line in verify(prefix, tokenizer_model=args.tokenizer_model).lines():
        print(line)
    return 0


def add_commands(sub) -> None:
    """Add ``preprocess`` and ``data verify`` to the ``megadistill`` subparsers ``sub``."""
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
