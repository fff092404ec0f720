"""Integrity of a Megatron indexed dataset (``<prefix>.bin/.idx``) and of the checksum manifest
``preprocess`` writes beside it, so that damaged data stops a run at start instead of training.

The checks, cheapest first:

- :func:`check_index` with ``full=False`` reads a few bytes. It checks the ``.idx`` header (magic,
  version, token dtype, sequence and document counts) and the ``.idx`` size those counts imply.
  It checks the first and last entries of the document index, and that the last sequence's
  pointer + length x itemsize is the ``.bin`` size. That finds any truncation of either file, and
  an index paired with another dataset's tokens. Preflight runs this check.
- :func:`check_index` with ``full=True`` also reads the whole ``.idx`` (not the ``.bin``). Lengths
  must be non-negative, each pointer must be where the sequences before it end (megatron-core's
  writer lays them out contiguously), and the document index must never decrease. That finds
  corruption inside the index. It runs whenever the datasets are built, on every rank.
- The manifest ``<prefix>.manifest.json`` records the size and SHA-256 of the ``.bin``, ``.idx``
  and ``.model`` at preprocess time. Sizes are always compared. Hashing streams the file at about
  1 s/GB, so at start only files up to :data:`HASH_AT_START_BYTES` are hashed. Only the hash finds
  a change in place that keeps the structure, such as token ids rewritten within the vocabulary.
- Every token id must be below the tokenizer's vocabulary size. This streams the ``.bin`` at
  about 0.1 s/GB.

:func:`verify` runs all of them; ``megadistill data verify PREFIX`` runs them without a size limit.
Data written by Megatron-LM's own tools has no manifest, so only its structure and token ids are
checked. Every error is a :class:`~megadistill.data.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from megadistill.data.errors import DataError
from megadistill.hashing import file_sha256

PathLike = Union[str, Path]

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "megadistill-manifest/1"

HASH_AT_START_BYTES = 1 << 30
"""At start, files up to this size are hashed against the manifest, and a ``.bin`` up to this size
has its token ids checked: at the limit, about 1.1 s on rank 0 (warm page cache; cold, the disk's
read speed decides). Larger files are size-checked only; ``megadistill data verify`` checks them
in full."""

_HEADER_FORMAT = "<QBQQ"  # after the magic: version, dtype code, sequence count, document count
_CHUNK = 1 << 22  # entries per vectorised step: memory stays bounded whatever the dataset's size
_REDO = "re-run preprocessing"


@dataclass(frozen=True)
class IndexSummary:
    """What a consistent ``.idx`` describes."""

    dtype: type
    """The token type (``numpy.uint16`` below 65500 pieces, else ``numpy.int32``)."""
    num_sequences: int
    num_documents: int
    num_tokens: int


# --------------------------------------------------------------------------- structure


def check_index(prefix: PathLike, full: bool = True) -> IndexSummary:
    """Check that ``<prefix>.idx`` and ``<prefix>.bin`` are consistent (see the module docstring).

    ``full=False`` reads only a few bytes; ``full=True`` reads the whole ``.idx`` in bounded chunks.
    ``FileNotFoundError`` for a missing file, ``DataError`` naming the file for anything else.
    """
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
    idx_size, bin_size = idx_path.stat().st_size, bin_path.stat().st_size
    if idx_size == 0:
        raise DataError(f"{idx_path} is empty; {_REDO}")

    # The header is parsed here rather than by megatron-core's reader: that reader fails on a
    # damaged index with bare numpy errors, before the counts that explain them are known.
    header_size = len(_INDEX_HEADER) + struct.calcsize(_HEADER_FORMAT)
    with open(idx_path, "rb") as f:
        head = f.read(header_size)
        if len(head) < header_size or not head.startswith(_INDEX_HEADER):
            raise DataError(f"{idx_path} is not a Megatron index file (its header is not {_INDEX_HEADER!r}); {_REDO}")
        version, code, n_seq, n_doc_entries = struct.unpack(_HEADER_FORMAT, head[len(_INDEX_HEADER):])
        if version != 1:
            raise DataError(f"{idx_path} has index version {version}; only version 1 is known (a corrupt header?)")
        try:
            dtype = DType.dtype_from_code(code)
        except ValueError:
            raise DataError(f"{idx_path} has an unknown token type code {code} in its header: corrupt; {_REDO}") from None
        itemsize = np.dtype(dtype).itemsize
        # Lengths (int32) and pointers (int64) per sequence, then the document index (int64),
        # which starts with 0 and ends with the sequence count: documents + 1 entries.
        expected = header_size + 12 * n_seq + 8 * n_doc_entries
        if idx_size != expected:
            raise DataError(
                f"{idx_path} is {idx_size} bytes, but its header describes {n_seq} sequences and "
                f"{max(n_doc_entries - 1, 0)} documents, which take {expected}: the index is truncated or corrupt; {_REDO}"
            )
        if n_seq == 0 or n_doc_entries < 2:
            raise DataError(f"{idx_path} holds no documents; {_REDO} with some text")

        def read(offset: int, fmt: str) -> int:
            f.seek(offset)
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        last_length = read(header_size + 4 * (n_seq - 1), "<i")
        last_pointer = read(header_size + 4 * n_seq + 8 * (n_seq - 1), "<q")
        docs_at = header_size + 12 * n_seq
        first_doc, last_doc = read(docs_at, "<q"), read(docs_at + 8 * (n_doc_entries - 1), "<q")
    if (first_doc, last_doc) != (0, n_seq):
        raise DataError(
            f"{idx_path}: its document index runs from sequence {first_doc} to {last_doc}, not from 0 "
            f"to the {n_seq} sequences it holds: corrupt; {_REDO}"
        )
    end = last_pointer + last_length * itemsize
    if end != bin_size:
        what = "truncated" if bin_size < end else "longer than its index says"
        raise DataError(
            f"{bin_path} is {bin_size} bytes, but its index {idx_path} ends the last sequence at byte "
            f"{end}: the .bin is {what}, or the two files come from different datasets; {_REDO}"
        )
    if full:
        _check_index_arrays(prefix, idx_path, itemsize)
    return IndexSummary(dtype, n_seq, n_doc_entries - 1, bin_size // itemsize)


def _load_index(prefix: PathLike, idx_path: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        # mmap=False: only the .idx is mapped; the .bin is not touched.
        return IndexedDataset(str(prefix), mmap=False).index
    except Exception as err:  # megatron-core asserts and lets numpy raise; the checks before leave little
        raise DataError(f"{idx_path}: megatron-core cannot read it ({type(err).__name__}: {err}); {_REDO}") from err


def _check_index_arrays(prefix: PathLike, idx_path: Path, itemsize: int) -> None:
    index = _load_index(prefix, idx_path)
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    start = 0  # byte where the next sequence must begin
    for lo in range(0, len(lengths), _CHUNK):
        chunk = lengths[lo : lo + _CHUNK].astype(np.int64)
        negative = chunk < 0
        if negative.any():
            i = int(np.argmax(negative))
            raise DataError(f"{idx_path}: sequence {lo + i} has a negative length {chunk[i]}: corrupt; {_REDO}")
        ends = start + np.cumsum(chunk * itemsize)
        starts = np.concatenate(([start], ends[:-1]))
        moved = pointers[lo : lo + _CHUNK] != starts
        if moved.any():
            i = int(np.argmax(moved))
            raise DataError(
                f"{idx_path}: sequence {lo + i} starts at byte {pointers[lo + i]} of the .bin, but the "
                f"sequences before it end at byte {starts[i]}: a length or pointer is corrupt; {_REDO}"
            )
        start = int(ends[-1])
    for lo in range(0, len(docs) - 1, _CHUNK):
        chunk = docs[lo : lo + _CHUNK + 1]  # one entry of overlap: every step is compared
        backwards = np.diff(chunk) < 0
        if backwards.any():
            i = int(np.argmax(backwards))
            raise DataError(
                f"{idx_path}: document {lo + i} ends at sequence {chunk[i + 1]}, before it starts "
                f"(sequence {chunk[i]}): the document index is corrupt; {_REDO}"
            )


def _document_of(prefix: PathLike, token: int, itemsize: int) -> int:
    """The document holding the ``token``-th token of the ``.bin`` (for error messages)."""
    index = _load_index(prefix, Path(f"{prefix}.idx"))
    sequence = int(np.searchsorted(index.sequence_pointers, token * itemsize, side="right")) - 1
    return int(np.searchsorted(index.document_indices, sequence, side="right")) - 1


def check_token_ids(prefix: PathLike, summary: IndexSummary, vocab_size: int, tokenizer: PathLike) -> None:
    """Every token id in ``<prefix>.bin`` is in ``[0, vocab_size)`` (streamed, bounded memory)."""
    bin_path = Path(f"{prefix}.bin")
    if summary.num_tokens == 0:
        return
    tokens = np.memmap(bin_path, dtype=summary.dtype, mode="r", shape=(summary.num_tokens,))
    signed = np.issubdtype(summary.dtype, np.signedinteger)
    for lo in range(0, summary.num_tokens, 4 * _CHUNK):
        chunk = tokens[lo : lo + 4 * _CHUNK]
        # Reductions first (one pass, no temporaries); the position only once something is wrong.
        if chunk.max() >= vocab_size or (signed and chunk.min() < 0):
            i = lo + int(np.argmax((chunk >= vocab_size) | (chunk < 0)))
            doc = _document_of(prefix, i, np.dtype(summary.dtype).itemsize)
            raise DataError(
                f"{bin_path}: token {i} (document {doc}) is id {int(tokens[i])}, not below the vocabulary "
                f"size {vocab_size} of {tokenizer}: the data was written with another tokenizer, or is corrupt"
            )


# --------------------------------------------------------------------------- manifest


def manifest(files: dict, **info) -> dict:
    """A manifest for ``files`` (suffix → path: the staged files, before they are moved into
    place under the prefix) and the JSON-able ``info``."""
    records = {ext: {"size": Path(p).stat().st_size, "sha256": file_sha256(p)} for ext, p in files.items()}
    return {"format": MANIFEST_FORMAT, "files": records, **info}


def read_manifest(prefix: PathLike) -> Optional[dict]:
    """``<prefix>.manifest.json``, or None if there is none (data not written by megadistill)."""
    path = Path(f"{prefix}{MANIFEST_SUFFIX}")
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(found, dict) or found.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"its format is not {MANIFEST_FORMAT}")
        for ext, record in found["files"].items():
            if not (isinstance(record["size"], int) and isinstance(record["sha256"], str)):
                raise ValueError(f"bad record for {ext}")
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSONDecodeError and UnicodeError are ValueErrors
        raise DataError(
            f"{path} is not a valid manifest ({err}); {_REDO}, or delete it to check the structure only"
        ) from err
    return found


def check_manifest(prefix: PathLike, found: dict, hash_limit: Optional[int] = None) -> tuple[list, list]:
    """Compare the files with manifest ``found``: every size, and the SHA-256 of every file up to
    ``hash_limit`` bytes (None: all). Returns the suffixes (hashed, only size-checked)."""
    where = f"{prefix}{MANIFEST_SUFFIX}"
    hashed, unhashed = [], []
    for ext, record in found["files"].items():
        path = Path(f"{prefix}{ext}")
        if not path.is_file():
            raise DataError(f"{path} is missing, though its manifest {where} lists it; {_REDO}")
        size = path.stat().st_size
        if size != record["size"]:
            raise DataError(
                f"{path} is {size} bytes, but its manifest {where} records {record['size']}: the file "
                f"changed since preprocessing; {_REDO}"
            )
        if hash_limit is not None and size > hash_limit:
            unhashed.append(ext)
            continue
        digest = file_sha256(path)
        if digest != record["sha256"]:
            raise DataError(
                f"{path} does not match its manifest {where} (sha256 {digest[:16]}..., recorded "
                f"{record['sha256'][:16]}...): the file was modified or damaged since preprocessing; "
                f"{_REDO} (or delete the manifest if the change was intended)"
            )
        hashed.append(ext)
    return hashed, unhashed


def quick_check(prefix: PathLike) -> IndexSummary:
    """What costs a few reads whatever the size: :func:`check_index` ``full=False`` and the sizes
    the manifest records (preflight)."""
    summary = check_index(prefix, full=False)
    found = read_manifest(prefix)
    if found is not None:
        check_manifest(prefix, found, hash_limit=-1)
    return summary


# --------------------------------------------------------------------------- everything


@dataclass
class VerifyReport:
    """What :func:`verify` checked."""

    prefix: str
    summary: IndexSummary
    manifest: bool
    """Whether there was a manifest to compare with."""
    hashed: list = field(default_factory=list)
    unhashed: list = field(default_factory=list)
    """Suffixes whose SHA-256 matched / that were only size-checked (above the hash limit)."""
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    ids_checked: bool = False

    def lines(self) -> list[str]:
        """A human summary, one check per line."""
        s = self.summary
        out = [
            f"{self.prefix}: {s.num_documents} documents, {s.num_sequences} sequences, {s.num_tokens} tokens "
            f"({np.dtype(s.dtype).name}); .idx and .bin consistent"
        ]
        if not self.manifest:
            out.append(f"no manifest {self.prefix}{MANIFEST_SUFFIX} (data not written by megadistill): checksums not checked")
        else:
            if self.hashed:
                out.append(f"sha256 of {', '.join(self.hashed)} match {self.prefix}{MANIFEST_SUFFIX}")
            if self.unhashed:
                out.append(f"size only (above the hash limit): {', '.join(self.unhashed)}")
        if self.ids_checked:
            out.append(f"token ids all below {self.vocab_size}, the vocabulary of {self.tokenizer}")
        elif self.tokenizer is None:
            out.append("token ids not checked: no tokenizer beside the data (give --tokenizer-model)")
        else:
            out.append("token ids not checked (the .bin is above the size limit)")
        return out


def verify(prefix: PathLike, tokenizer_model: Optional[PathLike] = None, hash_limit: Optional[int] = None,
           tokenizer_type: Optional[str] = None) -> VerifyReport:
    """Every check on ``prefix``: the full structure; the manifest, if any (sizes, and SHA-256 of
    files up to ``hash_limit`` bytes, all when None); token ids below the vocabulary of
    ``tokenizer_model`` (default ``<prefix>.model``, else ``<prefix>.tokenizer.json``, if it exists)
    when the ``.bin`` is within the limit. ``tokenizer_type`` (sentencepiece, huggingface; None =
    a directory or ``.json`` file is a Hugging Face tokenizer) says how to read it. Raises
    ``DataError`` naming the file at the first problem."""
    summary = check_index(prefix, full=True)
    found = read_manifest(prefix)
    report = VerifyReport(str(prefix), summary, manifest=found is not None)
    if found is not None:
        report.hashed, report.unhashed = check_manifest(prefix, found, hash_limit)
    model = Path(tokenizer_model) if tokenizer_model is not None else Path(f"{prefix}.model")
    if tokenizer_model is None and not model.is_file() and Path(f"{prefix}.tokenizer.json").is_file():
        model = Path(f"{prefix}.tokenizer.json")  # written with a Hugging Face tokenizer
    if tokenizer_model is not None or model.is_file():
        # The tokenizer module imports megatron-core: only when there is a tokenizer to read.
        from megadistill.data.tokenizer import tokenizer_vocab_size

        report.tokenizer, report.vocab_size = str(model), tokenizer_vocab_size(model, tokenizer_type)
        if hash_limit is None or Path(f"{prefix}.bin").stat().st_size <= hash_limit:
            check_token_ids(prefix, summary, report.vocab_size, model)
            report.ids_checked = True
    return report
