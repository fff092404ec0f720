"""The run's tokenizer as a Hugging Face tokenizer directory (``megadistill export-hf``), which
``transformers.AutoTokenizer.from_pretrained`` loads and which encodes text into the ids training
used (``megadistill.data.tokenizer``: no BOS, no end-of-text token added).

- A Hugging Face tokenizer (``data.tokenizer_type: huggingface``) is copied as it is:
  ``tokenizer.json`` and the files beside it that describe it (``tokenizer_config.json``,
  ``special_tokens_map.json``, ...). Without a ``tokenizer_config.json``, one is written naming
  the end-of-text token training used and the generic fast tokenizer class.
- A sentencepiece model is wrapped: a ``tokenizer.json`` built with the ``tokenizers`` library
  (:func:`wrap_sentencepiece`), next to a copy of the ``.model`` (``tokenizer.model``) and a
  ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast`` (else transformers would pick the
  architecture's own tokenizer class, which may add a BOS). The wrap is a BPE model with
  sentencepiece's pieces as its vocabulary (same ids) and, as merges, every pair of pieces whose
  concatenation is a piece, ranked by that piece's score: sentencepiece's BPE merges the adjacent
  pair whose result scores highest, which is the merge of lowest rank here. Spaces become ``▁``
  (and one is prepended where the model adds a dummy prefix); characters outside the vocabulary
  become their UTF-8 byte pieces (``<0xNN>``, byte fallback). The control and unknown pieces
  (``</s>``, ``<unk>``) are special tokens.

  Only what this reproduces exactly is wrapped: a sentencepiece model whose normalisation is the
  identity (megadistill trains such models: byte-fallback BPE, no NFKC, spaces kept) and that has
  byte pieces. Anything else is refused with an ``ExportError``, as is a wrap whose ids differ from
  sentencepiece's on any document of the embedded corpus (``megadistill.data.corpus``) or on a few
  hard strings (runs of spaces, tabs, characters outside the vocabulary), which every export
  checks before it writes. (Literal ``</s>`` or ``<unk>`` in a text are special tokens to
  Hugging Face, as for every sentencepiece tokenizer it wraps, and text to sentencepiece.)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megadistill.hf.errors import ExportError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_COPY = "tokenizer.model"

# The files of a Hugging Face tokenizer directory (as save_pretrained writes them) copied with it.
_HF_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
             "chat_template.json")

# Strings a wrap must encode as sentencepiece does besides the corpus: runs of spaces (whitespace-only
# pieces), leading and trailing spaces, tabs, newlines, digits, and characters outside the vocabulary.
_HARD_STRINGS = (" ", "  x", "a   b    c\n\n\t\tdef f(x):\n        return x  ", "12345 67.89",
                 "naïve café ﬁ ｆｕｌｌ 日本語 🙂", "\x00\x7f", "x" * 300)


@dataclass
class ExportedTokenizer:
    """What :func:`write_tokenizer` wrote."""

    files: list
    """The files written into the output directory."""
    kind: str
    """huggingface (copied) or sentencepiece (wrapped)."""
    eos_token: str
    eos_token_id: int
    bos_token_id: Optional[int]
    checked_texts: int
    """Texts whose ids were compared with the training tokenizer's (0 for a copy)."""


def write_tokenizer(tokenizer, path: str | Path, tokenizer_type: str, out: Path, max_length: int) -> ExportedTokenizer:
    """Write the run's ``tokenizer`` (a ``megadistill.data.tokenizer`` tokenizer, read from ``path``
    of kind ``tokenizer_type``) into the directory ``out`` as a Hugging Face tokenizer;
    ``max_length`` is the model's context (``model_max_length``)."""
    if tokenizer_type == "huggingface":
        return _copy_huggingface(tokenizer, Path(path), out, max_length)
    return _wrap(tokenizer, out, max_length)


def _copy_huggingface(tokenizer, path: Path, out: Path, max_length: int) -> ExportedTokenizer:
    source = path if path.is_dir() else path.parent
    files = []
    shutil.copyfile(tokenizer.model_path, out / TOKENIZER_JSON)  # the file training read, whatever its name
    files.append(TOKENIZER_JSON)
    # The other files describe the tokenizer.json only when they sit beside it (a directory given,
    # or a tokenizer.json file in one, as megadistill.data.tokenizer reads them).
    for name in _HF_FILES[1:]:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            files.append(name)
    if TOKENIZER_CONFIG not in files:
        _write_json(out / TOKENIZER_CONFIG, _config(tokenizer.eod_token, None, max_length))
        files.append(TOKENIZER_CONFIG)
    bos = _bos_token(out / TOKENIZER_CONFIG)
    vocab = tokenizer.vocab
    return ExportedTokenizer(files, "huggingface", tokenizer.eod_token, tokenizer.eod,
                             vocab.get(bos) if bos is not None else None, 0)


def _wrap(tokenizer, out: Path, max_length: int) -> ExportedTokenizer:
    from tokenizers import Tokenizer

    where = f"tokenizer {tokenizer.model_path}"
    wrapped = wrap_sentencepiece(tokenizer.model_path)
    checked = check_same_ids(tokenizer, Tokenizer.from_str(wrapped.to_str()), where)
    wrapped.save(str(out / TOKENIZER_JSON))
    shutil.copyfile(tokenizer.model_path, out / SENTENCEPIECE_COPY)
    pieces = {i: p for p, i in tokenizer.vocab.items()}
    eos, unk = pieces[tokenizer.eod], wrapped.model.unk_token
    _write_json(out / TOKENIZER_CONFIG, _config(eos, unk, max_length))
    return ExportedTokenizer([TOKENIZER_JSON, SENTENCEPIECE_COPY, TOKENIZER_CONFIG], "sentencepiece", eos, tokenizer.eod,
                             None, checked)


def wrap_sentencepiece(model_path: str | Path):
    """The ``tokenizers.Tokenizer`` that encodes as the sentencepiece model at ``model_path`` does
    (module docstring); ``ExportError`` naming the file for a model it cannot reproduce."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    where = f"tokenizer {model_path}"
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    if not any(sp.is_byte(i) for i in range(n)):
        raise ExportError(f"{where}: a sentencepiece model without byte pieces (byte_fallback) maps rare characters to "
                          "<unk>, which its Hugging Face wrap does not reproduce; export with a Hugging Face tokenizer "
                          "(--tokenizer)")
    dummy = sp.normalize("a").startswith("▁")
    for text in _HARD_STRINGS:
        expected = ("▁" if dummy else "") + text.replace(" ", "▁")
        if sp.normalize(text) != expected:
            raise ExportError(f"{where}: the model normalises text (NFKC, or removing spaces: {text!r} -> "
                              f"{sp.normalize(text)!r}); only sentencepiece models that keep text as it is are wrapped "
                              "(megadistill trains such); export with a Hugging Face tokenizer (--tokenizer)")
    normal = {p: i for i, p in enumerate(pieces)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))}
    merges = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(i), i, normal[left], normal[right], left, right))
    merges.sort()
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[(m[4], m[5]) for m in merges],
                               unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if dummy else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    specials = [pieces[i] for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok


def check_same_ids(tokenizer, wrapped, where: str) -> int:
    """Compare the ids of the training ``tokenizer`` and the ``tokenizers.Tokenizer`` ``wrapped``
    on every document of the embedded corpus and the hard strings; returns how many texts were
    compared, raises ``ExportError`` naming the first that differs."""
    from megadistill.data.corpus import embedded_corpus_text

    texts = [t for t in embedded_corpus_text().split("\n\n") if t] + list(_HARD_STRINGS)
    got = wrapped.encode_batch(texts, add_special_tokens=False)
    for i, (text, enc) in enumerate(zip(texts, got)):
        want = tokenizer.tokenize(text)
        if enc.ids != want:
            at = next((k for k, (a, b) in enumerate(zip(enc.ids, want)) if a != b), min(len(enc.ids), len(want)))
            raise ExportError(f"{where}: its Hugging Face wrap encodes text {i} of the embedded corpus differently from "
                              f"sentencepiece (from token {at}: {enc.ids[at:at + 4]} vs {want[at:at + 4]}); export "
                              "with a Hugging Face tokenizer (--tokenizer)")
    return len(texts)


def _config(eos: str, unk: Optional[str], max_length: int) -> dict:
    """A ``tokenizer_config.json`` for the generic fast tokenizer: no BOS or EOS added, text
    decoded as it was (no clean-up of spaces)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None, "pad_token": None,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_length}
    if unk is not None:
        config["unk_token"] = unk
    return config


def _bos_token(config_file: Path) -> Optional[str]:
    try:
        bos = json.loads(config_file.read_text(encoding="utf-8")).get("bos_token")
    except (ValueError, OSError, AttributeError) as err:
        raise ExportError(f"{config_file} is not a readable tokenizer config ({err})") from err
    if isinstance(bos, dict):  # older files: an AddedToken record
        bos = bos.get("content")
    return bos if isinstance(bos, str) and bos else None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
