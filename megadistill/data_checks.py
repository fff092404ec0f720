"""Pure checks of data settings, light enough for config validation (no Megatron import), and
the error every data problem raises."""

from __future__ import annotations

import re

MIN_VOCAB_SIZE = 256 + 2 + 1  # byte pieces + <unk> + </s> + at least one learned piece


class DataError(ValueError):
    """Bad input text, a damaged or mismatched ``.bin/.idx/.model``, or a preprocessing setting the
    data cannot satisfy. The message is one line naming the file (and line, where there is one);
    the command line prints it and exits with status 2."""


def check_split(split: str) -> str:
    """``" 90, 10"`` → ``"90,10"``, checked. Megatron's own parser silently skips stray characters
    (``"-5"`` reads as ``5``, ``"1e-3"`` as ``1,3``), so only plain decimal numbers pass here."""
    parts = [p.strip() for p in split.split(",")] if isinstance(split, str) else []
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(f"split must be 1 to 3 comma-separated non-negative numbers (train,valid,test), got {split!r}")
    if float(parts[0]) == 0:
        raise ValueError(f"split {split!r} leaves no documents for training")
    return ",".join(parts)
