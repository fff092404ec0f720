"""Training data: a sentencepiece (or Hugging Face) tokenizer and Megatron's indexed dataset (``.bin/.idx``).

    text files ──read_documents──► documents ──train_tokenizer──► <prefix>.model
                                       └────────preprocess────────► <prefix>.bin + <prefix>.idx
    <prefix>.bin/.idx ──build_gpt_datasets──► megatron-core GPTDataset (train, valid)

Writing uses megatron-core's ``IndexedDatasetBuilder`` and reading its ``GPTDataset`` through
``BlendedMegatronDatasetBuilder``, so data preprocessed by Megatron-LM's tools works here unchanged
(and ours works there).

Inputs:

- ``.txt``: one document per block of lines, blocks separated by blank (whitespace-only) lines.
  A document keeps its lines exactly as in the file (inner newlines included, without the block's
  final newline). Choosing blocks over whole files lets a single text file be split into train and
  valid *documents*.
- ``.jsonl``: one JSON object per line, the document under ``json_key``. Blank lines are skipped.
- No inputs: the embedded corpus, the Python documentation every interpreter ships
  (``pydoc_data.topics``, ~465 K characters, 79 topics), one document per topic. No download.

Empty documents are skipped: they carry no tokens. Every document is stored as one Megatron
document of ``len(tokenize(text)) + 1`` tokens: its tokens, then the end-of-document token ``eod``.

Beside the data, ``preprocess`` writes ``<prefix>.manifest.json``: the size and SHA-256 of the
``.bin``, ``.idx`` and ``.model``, and the recipe (the inputs' sizes and SHA-256, the tokenizer's
SHA-256 or the vocabulary size to train). ``megadistill.data_integrity`` checks data against it.

A given Hugging Face tokenizer (``tokenizer_type="huggingface"``, ``megadistill.hf.tokenizer``)
works the same way: its ``tokenizer.json`` is copied to ``<prefix>.tokenizer.json`` instead of the
``.model``, and the recipe also records the type and the end-of-document id. Such a tokenizer is
lossless only if its own normaliser and pre-tokeniser are (byte-level BPE is).

Every problem with the inputs, the settings or the data files is a ``DataError`` (a
``ValueError``) naming the file, and the line where there is one.

The tokenizer is lossless: ``detokenize(tokenize(text)) == text`` for any string (no Unicode
normalisation, whitespace kept as it is, unknown characters fall back to their UTF-8 bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase
from tqdm import tqdm

from megadistill import data_integrity
from megadistill.data_checks import MIN_VOCAB_SIZE as _MIN_VOCAB_SIZE
from megadistill.data_checks import DataError
from megadistill.data_checks import check_split as _check_split

PathLike = Union[str, Path]

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)

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


# --------------------------------------------------------------------------- documents


def _embedded_documents() -> list[str]:
    """The embedded corpus, one document per pydoc topic (in the module's fixed order)."""
    from pydoc_data.topics import topics

    return [text for text in topics.values() if text]


def embedded_corpus_text() -> str:
    """The embedded default corpus as one string: the stdlib's ``pydoc_data.topics`` texts
    (~465 K characters of English about Python), separated by blank lines."""
    return "\n\n".join(_embedded_documents())


def read_documents(paths: Union[PathLike, Sequence[PathLike]], json_key: str = "text") -> Iterator[str]:
    """The documents of ``.txt`` and ``.jsonl`` files, in file order (see the module docstring).

    Every path is checked before the first document is read: ``FileNotFoundError`` for a missing
    file, ``DataError`` for a directory, an unreadable or empty file, or an unknown suffix. Content
    errors (invalid UTF-8, NUL characters, a bad JSONL line, a missing or non-string ``json_key``,
    text that is not valid Unicode, a file without any document) raise ``DataError`` naming the
    file, and the line where there is one, when reached.
    """
    files = _check_inputs(paths, json_key)
    return _iter_documents(files, json_key)


def _check_inputs(paths: Union[PathLike, Sequence[PathLike]], json_key: str) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise DataError("no input files given")
    if not isinstance(json_key, str) or not json_key:
        raise DataError(f"json_key must be a non-empty string, got {json_key!r}")
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"input file not found: {path}")
        if path.is_dir():
            raise DataError(f"input {path} is a directory, not a file")
        if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
            raise DataError(
                f"input {path}: unsupported file type {path.suffix!r}; use .txt (documents separated "
                f"by blank lines) or .jsonl (one JSON object per line, the text under key {json_key!r})"
            )
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as err:
            raise DataError(f"cannot read input file {path}: {err.strerror or err}") from err
        if path.stat().st_size == 0:
            raise DataError(f"input file {path} is empty")
    return files


def _iter_documents(files: list[Path], json_key: str) -> Iterator[str]:
    for path in files:
        reader = _iter_txt(path) if path.suffix in TEXT_SUFFIXES else _iter_jsonl(path, json_key)
        count = 0
        for doc in reader:
            count += 1
            yield doc
        if count == 0:
            raise DataError(f"input file {path} contains no documents")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}, line {lineno}: not valid UTF-8 text ({err.reason} at byte {err.start}); convert the file to UTF-8"
        ) from err
    # Valid UTF-8 but not text: UTF-16 without a byte-order mark (every other byte NUL), or binary
    # data that happens to decode; it would otherwise be tokenized as it is.
    if "\x00" in line:
        raise DataError(
            f"{path}, line {lineno}: contains NUL characters (a binary file, or UTF-16 text?); inputs must be UTF-8 text"
        )
    return line


def _iter_txt(path: Path) -> Iterator[str]:
    # Binary lines decoded one by one: errors get an exact line number, and line endings are kept
    # as they are in the file.
    block: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\r\n")
                block = []
    if block:
        yield "".join(block).rstrip("\r\n")


def _iter_jsonl(path: Path, json_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            if json_key not in record:
                keys = ", ".join(map(repr, list(record)[:10])) or "none"
                raise DataError(f"{path}, line {lineno}: no key {json_key!r} in the JSON object (keys: {keys})")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}, line {lineno}: {json_key!r} must be a string, got {type(text).__name__}")
            # JSON may escape half of a surrogate pair ("\ud83d" alone): not a character, and
            # sentencepiece fails on it with a bare pybind11 cast error.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataError(
                    f"{path}, line {lineno}: {json_key!r} is not valid Unicode (a lone surrogate "
                    f"{text[err.start]!r} at character {err.start})"
                ) from err
            if text:
                yield text


# --------------------------------------------------------------------------- tokenizer


class PretrainingTokenizer(MegatronTokenizerBase):
    """What megadistill's tokenizers share: megatron-core's tokenizer interface, for pre-training text."""

    def apply_chat_template(self, *args, **kwargs):
        """Abstract in megatron's tokenizer base class; pre-training text has no chat format, and no
        megadistill path calls it."""
        raise NotImplementedError(f"{type(self).__name__} is for pre-training text; it has no chat template")


class SentencePieceTokenizer(PretrainingTokenizer):
    """A sentencepiece model as the tokenizer megatron-core's datasets expect.

    ``GPTDataset`` reads ``eod`` (end of document, sentencepiece's ``</s>``), ``vocab_size``, and
    ``unique_identifiers``, which goes into the hash naming its index cache. The identifiers hold the
    model file's SHA-256, not its path: a retrained tokenizer never reuses a stale cache, and moving
    the files does not invalidate a good one. There is no pad token: Megatron then pads with a -1
    sentinel that never collides with a real id.
    """

    def __init__(self, model_path: PathLike) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self._setup(path.read_bytes(), path)

    @classmethod
    def load(cls, model_path: PathLike) -> "SentencePieceTokenizer":
        """Load a sentencepiece ``.model`` file."""
        return cls(model_path)

    @classmethod
    def _from_proto(cls, proto: bytes, model_path: Path) -> "SentencePieceTokenizer":
        """A tokenizer from model bytes that will be (but need not yet be) at ``model_path``."""
        tokenizer = cls.__new__(cls)
        tokenizer._setup(proto, model_path)
        return tokenizer

    def _setup(self, proto: bytes, path: Path) -> None:
        super().__init__(str(path), {"library": "sentencepiece"})
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:
            raise DataError(f"{path} is not a sentencepiece model ({err})") from err
        self._proto = proto
        self.model_path = path
        self.sha256 = hashlib.sha256(proto).hexdigest()
        if self._sp.eos_id() < 0:
            raise DataError(f"tokenizer {path} has no </s> piece to mark the end of a document")
        self.unique_identifiers = OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("model_sha256", self.sha256)]
        )

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are ``0 .. vocab_size-1``); the model's embedding may pad it up."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """The end-of-document id appended to every document."""
        return self._sp.eos_id()

    @property
    def vocab(self) -> dict[str, int]:
        """Piece → id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        """``text`` → ids ``[n]``; never contains ``eod``."""
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids (a list, numpy array or tensor ``[n]``) → text; ``eod`` decodes to nothing."""
        return self._sp.decode([int(i) for i in ids])


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
        source = [{"size": Path(p).stat().st_size, "sha256": data_integrity.file_sha256(p)} for p in inputs]
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
    from megadistill.hf.tokenizer import HuggingFaceTokenizer, load_tokenizer

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


# --------------------------------------------------------------------------- datasets


def _idx_fingerprint(idx_path: str) -> str:
    """Hash of the ``.idx``: the sample indices Megatron caches depend on the document lengths it
    holds (and on the config, which Megatron hashes itself), not on the ``.bin``."""
    digest = hashlib.blake2b(digest_size=8)
    with open(idx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_gpt_datasets(
    data_prefix: PathLike,
    tokenizer: SentencePieceTokenizer,
    seq_length: int,
    split: str,
    num_samples: tuple[int, int],
    seed: int,
    cache_dir: Optional[PathLike] = None,
) -> tuple[GPTDataset, Optional[GPTDataset]]:
    """Megatron-core GPTDatasets (train, valid) over ``<data_prefix>.bin/.idx``.

    ``split`` ("train,valid[,test]" weights, e.g. "90,10,0") divides the *documents* into contiguous
    ranges, train first, as Megatron does; valid is None when its weight is 0. Each dataset has at
    least ``num_samples`` (train, valid) samples, repeating its documents over epochs as needed.
    A sample is a dict of ``[seq_length]`` tensors: ``tokens``, ``labels`` (int64, the tokens shifted
    by one), ``loss_mask`` (float32, all ones: ``eod`` is a target too) and ``position_ids`` (int64,
    ``0..seq_length-1``). No attention mask: the model uses its causal mask. The sample order is a
    function of ``seed`` only.

    The ``.bin/.idx`` structure is checked first (``data_integrity.check_index``: reads the
    ``.idx`` only); a damaged file raises ``DataError`` naming it.

    Megatron caches each dataset's sample indices under ``cache_dir`` (default
    ``<data_prefix>.cache``), in a subdirectory named after a hash of the ``.idx``, so rewriting the
    data never reuses indices of the old data. Under ``torch.distributed``, every rank must call
    this (Megatron's builder has barriers): rank 0 builds the indices, the others then read them,
    so ``cache_dir`` must be on a file system all ranks share. Works without a process group too.
    """
    prefix = str(data_prefix)  # Megatron appends ".bin"/".idx" to a str prefix
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise FileNotFoundError(f"dataset file not found: {prefix + ext}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    if len(num_samples) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be (train, valid) non-negative integers, got {num_samples!r}")
    split = _check_split(split)

    # The data must have been written with this tokenizer; only our own layout records which one.
    sibling = Path(prefix + getattr(tokenizer, "DATA_SUFFIX", ".model"))
    sha = getattr(tokenizer, "sha256", None)
    if sha is not None and sibling.is_file() and hashlib.sha256(sibling.read_bytes()).hexdigest() != sha:
        raise DataError(
            f"{prefix}.bin was written with the tokenizer {sibling}, not with {tokenizer.model_path} "
            f"(the models differ): token ids would be misread"
        )

    # Megatron reads a truncated or corrupt .bin/.idx without complaint (or fails with bare numpy
    # errors): every rank checks the structure first. The reads are the .idx's, not the tokens'.
    # GPTDataset splits by sequence; ours are one per document, as in Megatron-LM's text preprocessing.
    num_documents = data_integrity.check_index(prefix, full=True).num_sequences

    # Megatron's builder gives a split with no document an empty index and then loops forever
    # looking for tokens, so refuse such splits here, with the same arithmetic as the builder.
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(("train", "valid", "test"), matrix):
        if bounds is not None and round(bounds[0] * num_documents) == round(bounds[1] * num_documents):
            raise DataError(
                f"split {split!r} of the {num_documents} documents in {prefix} leaves the {name} split "
                f"without documents; use more documents or a larger {name} weight"
            )

    cache = Path(cache_dir) if cache_dir is not None else Path(prefix + ".cache")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache / f"idx-{_idx_fingerprint(prefix + '.idx')}"),
    )
    # Every rank builds its own (cheap, memory-mapped) datasets; the test split, if any, gets one epoch.
    train, valid, _test = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], None], lambda: True, config
    ).build()
    return train, valid
