"""The tokenizer interface: a sentencepiece ``.model`` or a Hugging Face tokenizer (``tokenizer.json``).

``data.tokenizer_type`` picks the kind, ``data.tokenizer_model`` the path: a sentencepiece
``.model`` file, or for ``huggingface`` a ``tokenizer.json`` file or a Hugging Face tokenizer
directory holding one (as ``save_pretrained`` writes it). Both kinds are megatron-core tokenizers
(``MegatronTokenizerBase``), as megatron-core's ``GPTDataset`` reads them, with the same surface:

- ``tokenize(text) -> list[int]`` (no special tokens added: no BOS, no ``eod``),
  ``detokenize(ids) -> str``;
- ``vocab_size`` (ids are ``0 .. vocab_size-1``; the model pads it up), ``eod`` (the end-of-document
  id appended to every document);
- ``sha256``: the tokenizer's content identity, the SHA-256 of the file that defines it (the
  ``.model``, or the ``tokenizer.json``: paths do not matter). Corpora, checkpoints, logits
  stores and score files record it; ``model_path`` is that file, so ``file_sha256(model_path)``
  equals ``sha256``.

The end-of-document token of a Hugging Face tokenizer is its ``eos_token`` from the
``tokenizer_config.json`` beside the ``tokenizer.json`` when there is one (as Megatron-LM's
``HuggingFaceTokenizer`` takes ``eos_token_id``), else the first of the usual end-of-text tokens
(:data:`EOD_CANDIDATES`) in its vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Union

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from megadistill.data.errors import DataError

PathLike = Union[str, Path]

TOKENIZER_TYPES = ("sentencepiece", "huggingface")
"""Values of ``data.tokenizer_type``."""

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""End-of-text tokens looked for when no ``tokenizer_config.json`` names the ``eos_token``
(GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma spellings)."""


def tokenizer_file(path: PathLike, tokenizer_type: str = "sentencepiece") -> Path:
    """The file that defines the tokenizer at ``path``: the sentencepiece ``.model`` itself, or the
    ``tokenizer.json`` (``path`` itself, or inside the directory ``path``). Its SHA-256 is the
    tokenizer's identity. Raises ``FileNotFoundError`` / ``DataError`` naming ``path``."""
    p = Path(path)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(f"tokenizer type {tokenizer_type!r} is not one of {TOKENIZER_TYPES}")
    if tokenizer_type == "sentencepiece":
        if p.is_dir():
            hint = " (it holds a tokenizer.json: use tokenizer type huggingface)" if (p / HF_TOKENIZER_FILE).is_file() else ""
            raise DataError(f"tokenizer {p} is a directory, not a sentencepiece .model file{hint}")
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {p}")
        return p
    if p.is_dir():
        if not (p / HF_TOKENIZER_FILE).is_file():
            found = sorted(c.name for c in p.iterdir())[:8]
            raise DataError(f"Hugging Face tokenizer directory {p} holds no {HF_TOKENIZER_FILE} (it holds: "
                            f"{', '.join(found) or 'nothing'}); only fast tokenizers (tokenizer.json) are supported")
        return p / HF_TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"Hugging Face tokenizer not found: {p} (a tokenizer.json file or a directory holding one)")
    return p


def load_tokenizer(path: PathLike, tokenizer_type: str = "sentencepiece"):
    """The tokenizer at ``path`` of kind ``tokenizer_type`` (``sentencepiece`` or ``huggingface``)."""
    file = tokenizer_file(path, tokenizer_type)
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(file)
    return HuggingFaceTokenizer(path)


def tokenizer_vocab_size(path: PathLike, tokenizer_type: Optional[str] = None) -> int:
    """The vocabulary size (before the model's padding) of the tokenizer at ``path``, of kind
    ``tokenizer_type`` (None: :func:`guess_tokenizer_type`). Raises ``FileNotFoundError`` /
    ``DataError`` naming ``path``."""
    tokenizer_type = tokenizer_type or guess_tokenizer_type(path)
    if tokenizer_type == "sentencepiece":
        # The model's piece count without building megatron's tokenizer around it.
        file = tokenizer_file(path, tokenizer_type)
        try:
            return spm.SentencePieceProcessor(model_file=str(file)).vocab_size()
        except (RuntimeError, OSError) as err:
            raise DataError(f"{file} is not a sentencepiece model ({err})") from err
    return load_tokenizer(path, tokenizer_type).vocab_size


def guess_tokenizer_type(path: PathLike) -> str:
    """``huggingface`` for a directory or a ``.json`` file, else ``sentencepiece`` (for commands
    without a config, e.g. ``megadistill data verify --tokenizer-model``)."""
    p = Path(path)
    return "huggingface" if p.is_dir() or p.suffix == ".json" else "sentencepiece"


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


class HuggingFaceTokenizer(PretrainingTokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``, read with the ``tokenizers`` library) as
    the tokenizer megatron-core's datasets expect; see the module docstring. ``eod`` may be given
    (a token string) to override the ``tokenizer_config.json`` / :data:`EOD_CANDIDATES` choice."""

    DATA_SUFFIX = ".tokenizer.json"
    """``megadistill.data.preprocess.preprocess`` copies the ``tokenizer.json`` to ``<prefix>.tokenizer.json``
    (a sentencepiece model goes to ``<prefix>.model``)."""

    def __init__(self, path: PathLike, eod: str | None = None) -> None:
        file = tokenizer_file(path, "huggingface")
        raw = file.read_bytes()
        self._setup(raw, file, self._config_file(Path(path), file), eod)

    @classmethod
    def _from_bytes(cls, raw: bytes, path: Path, eod_token: str) -> "HuggingFaceTokenizer":
        """A tokenizer from ``tokenizer.json`` bytes that will be (but need not yet be) at ``path``."""
        tokenizer = cls.__new__(cls)
        tokenizer._setup(raw, path, None, eod_token)
        return tokenizer

    @staticmethod
    def _config_file(given: Path, file: Path) -> Path | None:
        config = (given if given.is_dir() else file.parent) / HF_TOKENIZER_CONFIG
        return config if config.is_file() else None

    def _setup(self, raw: bytes, file: Path, config: Path | None, eod: str | None) -> None:
        from tokenizers import Tokenizer

        super().__init__(str(file), {"library": "huggingface"})
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"{file} is not a Hugging Face tokenizer.json ({err})") from err
        self._raw = raw
        self.model_path = file
        self.sha256 = hashlib.sha256(raw).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"tokenizer {file} has an empty vocabulary")
        # Ids need not be contiguous (added tokens far above the model's vocabulary): the
        # vocabulary the model must hold is the highest id + 1.
        self._vocab_size = max(vocab.values()) + 1
        self.eod_token = eod if eod is not None else self._find_eod(vocab, file, config)
        if self.eod_token not in vocab:
            raise DataError(f"tokenizer {file}: the end-of-document token {self.eod_token!r} is not in its vocabulary")
        self._eod = vocab[self.eod_token]
        self.unique_identifiers = OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("model_sha256", self.sha256),
             ("eod", self._eod)]
        )

    @staticmethod
    def _find_eod(vocab: dict, file: Path, config: Path | None) -> str:
        if config is not None:
            try:
                eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            except (ValueError, OSError, AttributeError) as err:
                raise DataError(f"{config} is not a readable tokenizer config ({err})") from err
            if isinstance(eos, dict):  # older files: an AddedToken record
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
        for token in EOD_CANDIDATES:
            if token in vocab:
                return token
        raise DataError(
            f"tokenizer {file}: cannot tell its end-of-document token: no {HF_TOKENIZER_CONFIG} with an eos_token "
            f"beside it, and none of {', '.join(EOD_CANDIDATES)} in its vocabulary"
        )

    @property
    def vocab_size(self) -> int:
        """Highest id + 1 (the rows the model's embedding needs before padding)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """The end-of-document id appended to every document."""
        return self._eod

    @property
    def vocab(self) -> dict[str, int]:
        """Token → id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        """``text`` → ids ``[n]``, without the special tokens a post-processor would add (no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids (a list, numpy array or tensor ``[n]``) → text, special tokens kept."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
