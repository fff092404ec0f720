"""Preprocessing: text → tokenizer → Megatron's indexed dataset (``<prefix>.bin/.idx``).

    text files ──corpus.read_documents──► documents ──train_tokenizer──► <prefix>.model
                                              └──────────preprocess──────► <prefix>.bin + <prefix>.idx

Writing uses megatron-core's ``IndexedDatasetBuilder``, so data preprocessed by Megatron-LM's tools
works here unchanged (and ours works there). Every document is stored as one Megatron document of
``len(tokenize(text)) + 1`` tokens: its tokens, then the end-of-document token ``eod``.

Beside the data, ``preprocess`` writes ``<prefix>.manifest.json``: the size and SHA-256 of the
``.bin``, ``.idx`` and ``.model``, and the recipe (the inputs' sizes and SHA-256, the tokenizer's
SHA-256 or the vocabulary size to train). ``megadistill.data.integrity`` checks data against it.

A given Hugging Face tokenizer (``tokenizer_type="huggingface"``) works the same way: its
``tokenizer.json`` is copied to ``<prefix>.tokenizer.json`` instead of the ``.model``, and the
recipe also records the type and the end-of-document id. Such a tokenizer is lossless only if its
own normaliser and pre-tokeniser are (byte-level BPE is). A trained sentencepiece tokenizer is
lossless: ``detokenize(tokenize(text)) == text`` for any string (no Unicode normalisation,
whitespace kept as it is, unknown characters fall back to their UTF-8 bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megadistill.config.schema import MIN_VOCAB_SIZE as _MIN_VOCAB_SIZE
from megadistill.data import integrity as data_integrity
from megadistill.data.corpus import _check_inputs, _embedded_documents, _iter_documents
from megadistill.data.errors import DataError
from megadistill.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer
from megadistill.hashing import file_sha256

PathLike = Union[str, Path]


# Sentencepiece keeps every training text in memory; beyond this many characters (the first
# documents, in order, so training stays deterministic) more text barely changes a small vocabulary.
TOKENIZER_TRAINING_CHARS = 100_000_000

# Ids fixed by the trainer options below: <unk> = 0 (never produced, thanks to byte fallback),
# </s> = 1 is the end-of-document token; no <s> and no pad piece.
_SP_TRAINER_OPTIONS = dict(
    model_type="bpe",
    # Lossless round trip: no NFKC, keep runs of spaces (code indentation) and leading spaces.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    # Rare characters (and "\t", ...) become their UTF-8 bytes instead of <unk>.
    byte_fallback=True,
    character_coverage=0.9995,
    split_digits=True,
    unk_id=0,
    eos_id=1,
    bos_id=-1,
    pad_id=-1,
    # Whole documents are training "sentences" (so pieces may contain "\n"); never skip one.
    max_sentence_length=4 * TOKENIZER_TRAINING_CHARS,
    # The thread count is recorded in the .model file: fix it so the bytes do not depend on the machine.
    num_threads=1,
    minloglevel=2,
)


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size must be an integer >= {_MIN_VOCAB_SIZE} (256 byte pieces, <unk>, </s> and "
            f"learned pieces), got {vocab_size!r}"
        )


def _train_sentencepiece(documents: Iterable[str], vocab_size: int) -> bytes:
    """Train the BPE model on ``documents``; the ``.model`` file's bytes. Deterministic."""
    _check_vocab_size(vocab_size)
    # Collected first, so a bad input raises here, with its own message, rather than inside the
    # C++ trainer.
    texts, budget = [], TOKENIZER_TRAINING_CHARS
    for doc in documents:
        if doc:
            texts.append(doc[:budget])
            budget -= len(texts[-1])
        if budget <= 0:
            break
    if not texts:
        raise DataError("no documents to train the tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, **_SP_TRAINER_OPTIONS
        )
    except RuntimeError as err:
        # e.g. "Vocabulary size too high (4096). Please set it to a value <= 1234."
        raise DataError(f"sentencepiece could not train a vocabulary of {vocab_size}: {err}") from err
    return model.getvalue()


def train_tokenizer(documents: Iterable[str], model_prefix: PathLike, vocab_size: int) -> Path:
    """Train a byte-fallback BPE sentencepiece model; write ``<model_prefix>.model`` atomically.

    Deterministic: the same documents and vocab size give the same file, byte for byte.
    Returns the ``.model`` path.
    """
    path = Path(f"{model_prefix}.model")
    proto = _train_sentencepiece(documents, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staged(path) as tmp:
        tmp.write_bytes(proto)
        os.replace(tmp, path)
    return path



# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class PreprocessResult:
    """What ``preprocess`` wrote."""

    prefix: Path
    """The dataset prefix: ``<prefix>.bin`` (tokens) and ``<prefix>.idx`` (Megatron's index)."""
    tokenizer_model: Path
    """``<prefix>.model`` (or ``<prefix>.tokenizer.json``), the tokenizer the data was written with."""
    num_documents: int
    num_tokens: int
    """All tokens in ``.bin``, one ``eod`` per document included."""
    vocab_size: int


@contextmanager
def _staged(*finals: Path) -> Iterator:
    """Temporary paths next to each final path (same directory, so ``os.replace`` is atomic),
    hidden, and removed on exit unless they were moved into place. Only names: the files are
    created by whoever writes them, with the usual permissions (``mkstemp`` would make them 0600)."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temps = [final.with_name(f".{final.name}.{tag}.tmp") for final in finals]
    try:
        yield temps[0] if len(temps) == 1 else temps
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _check_output_prefix(output_prefix: PathLike) -> Path:
    prefix = Path(output_prefix)
    if prefix.suffix in (".bin", ".idx", ".model"):
        raise DataError(
            f"output_prefix {prefix} ends in {prefix.suffix}: give the prefix without it "
            f"({prefix.with_suffix('')}), the .bin/.idx/.model files are named after it"
        )
    if prefix.is_dir():
        raise DataError(f"output_prefix {prefix} is a directory; give a file prefix inside it, e.g. {prefix / 'corpus'}")
    if prefix.parent.exists() and not prefix.parent.is_dir():
        raise DataError(f"output_prefix {prefix}: {prefix.parent} is not a directory")
    return prefix


def corpus_recipe(
    inputs: Optional[Sequence[PathLike]], json_key: str, vocab_size: int, tokenizer_sha256: Optional[str],
    hf_eod: Optional[int] = None,
) -> dict:
    """What a corpus is made from, by content: preprocessing is deterministic, so equal recipes
    give equal files. The inputs' sizes and SHA-256, in order, streamed (for the embedded corpus
    the SHA-256 of its documents, which change with the Python version); the given tokenizer's
    SHA-256, or else the vocabulary size and trainer settings; and the sentencepiece version.
    ``hf_eod`` (a Hugging Face tokenizer's end-of-document id) adds the tokenizer type, that id and
    the ``tokenizers`` version; sentencepiece recipes are unchanged by it."""
    if inputs is None:
        source = {"embedded_sha256": hashlib.sha256(json.dumps(_embedded_documents()).encode("utf-8")).hexdigest()}
    else:
        source = [{"size": Path(p).stat().st_size, "sha256": file_sha256(p)} for p in inputs]
    recipe = {"inputs": source, "json_key": None if inputs is None else json_key, "sentencepiece": spm.__version__}
    if tokenizer_sha256 is not None:
        recipe["tokenizer_sha256"] = tokenizer_sha256
        if hf_eod is not None:
            import tokenizers

            recipe.update(tokenizer_type="huggingface", eod=hf_eod, tokenizers=tokenizers.__version__)
    else:
        trainer = json.dumps([_SP_TRAINER_OPTIONS, TOKENIZER_TRAINING_CHARS], sort_keys=True).encode("utf-8")
        recipe.update(vocab_size=vocab_size, trainer_sha256=hashlib.sha256(trainer).hexdigest())
    return recipe


def preprocess(
    inputs: Optional[Sequence[PathLike]],
    output_prefix: PathLike,
    vocab_size: int = 2048,
    tokenizer_model: Optional[PathLike] = None,
    json_key: str = "text",
    progress: bool = True,
    tokenizer_type: str = "sentencepiece",
) -> PreprocessResult:
    """Tokenize documents into ``<output_prefix>.bin/.idx`` and put the tokenizer at ``<prefix>.model``.

    ``inputs`` are ``.txt``/``.jsonl`` files, or None for the embedded corpus. A new tokenizer of
    ``vocab_size`` pieces is trained on them unless ``tokenizer_model`` is given (then
    ``vocab_size`` is unused and the model is copied to ``<prefix>.model``; a ``tokenizer_type``
    ``"huggingface"`` tokenizer's ``tokenizer.json`` to ``<prefix>.tokenizer.json``). Each document becomes one
    Megatron document: its tokens followed by ``eod``. Deterministic. ``<prefix>.manifest.json``
    records the files' sizes and SHA-256 and the :func:`corpus_recipe` (the inputs are hashed
    before they are read, so an input edited meanwhile reads as changed next time).

    Everything is checked before any work, and written to hidden temporary files first. The
    ``.idx`` is the commit marker: it is removed before the new files are moved into place and
    moved in last, so an interrupted run leaves either the previous complete dataset or no
    ``.idx`` (``IndexedDataset.exists`` is then False), never a mismatched set. One writer per prefix.
    """
    prefix = _check_output_prefix(output_prefix)
    if inputs is None:
        documents = _embedded_documents
        total_bytes = sum(len(d.encode("utf-8")) for d in _embedded_documents())
    else:
        files = _check_inputs(inputs, json_key)

        def documents() -> Iterator[str]:  # read twice: to train the tokenizer, then to tokenize
            return _iter_documents(files, json_key)

        total_bytes = sum(f.stat().st_size for f in files)
    given = load_tokenizer(tokenizer_model, tokenizer_type) if tokenizer_model is not None else None
    hf = isinstance(given, HuggingFaceTokenizer)
    if given is None:
        _check_vocab_size(vocab_size)  # before hashing the inputs, which may take minutes
    sources = None if inputs is None else [str(f) for f in files]
    recipe = corpus_recipe(sources, json_key, vocab_size, None if given is None else given.sha256,
                           hf_eod=given.eod if hf else None)
    model_ext = HuggingFaceTokenizer.DATA_SUFFIX if hf else ".model"
    model_path, bin_path, idx_path, manifest_path = (
        Path(f"{prefix}{ext}") for ext in (model_ext, ".bin", ".idx", data_integrity.MANIFEST_SUFFIX)
    )
    if hf:
        proto = given._raw  # the tokenizer.json bytes
        tokenizer = HuggingFaceTokenizer._from_bytes(proto, model_path, given.eod_token)
    else:
        proto = given._proto if given is not None else _train_sentencepiece(documents(), vocab_size)
        tokenizer = SentencePieceTokenizer._from_proto(proto, model_path)

    prefix.parent.mkdir(parents=True, exist_ok=True)
    with _staged(model_path, bin_path, idx_path, manifest_path) as (tmp_model, tmp_bin, tmp_idx, tmp_manifest):
        tmp_model.write_bytes(proto)
        # uint16 tokens for vocabularies below 65500, as Megatron-LM's preprocess_data writes them.
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=DType.optimal_dtype(tokenizer.vocab_size))
        num_documents = num_tokens = 0
        try:
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
                for doc in documents():
                    ids = tokenizer.tokenize(doc)
                    ids.append(tokenizer.eod)
                    builder.add_item(torch.tensor(ids, dtype=torch.int64))
                    builder.end_document()
                    num_documents += 1
                    num_tokens += len(ids)
                    bar.update(len(doc.encode("utf-8")))
        finally:
            builder.data_file.close()
        builder.finalize(str(tmp_idx))
        record = data_integrity.manifest(
            {".bin": tmp_bin, ".idx": tmp_idx, model_ext: tmp_model},
            num_documents=num_documents, num_tokens=num_tokens, vocab_size=tokenizer.vocab_size,
            dtype=builder.dtype.__name__, sources=sources, recipe=recipe,
        )
        tmp_manifest.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

        idx_path.unlink(missing_ok=True)  # from here until the last replace, the prefix reads as absent
        os.replace(tmp_model, model_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_manifest, manifest_path)  # before the .idx: a complete set never has a stale manifest
        os.replace(tmp_idx, idx_path)
    return PreprocessResult(prefix, model_path, num_documents, num_tokens, tokenizer.vocab_size)


