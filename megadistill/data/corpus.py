"""Training text: the documents of ``.txt`` and ``.jsonl`` files, or of the embedded corpus.

- ``.txt``: one document per block of lines, blocks separated by blank (whitespace-only) lines.
  A document keeps its lines exactly as in the file (inner newlines included, without the block's
  final newline). Choosing blocks over whole files lets a single text file be split into train and
  valid *documents*.
- ``.jsonl``: one JSON object per line, the document under ``json_key``. Blank lines are skipped.
- No inputs: the embedded corpus, the Python documentation every interpreter ships
  (``pydoc_data.topics``, ~465 K characters, 79 topics), one document per topic. No download.

Empty documents are skipped: they carry no tokens. Every problem is a ``DataError`` naming the
file, and the line where there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence, Union

from megadistill.data.errors import DataError

PathLike = Union[str, Path]

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)


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
