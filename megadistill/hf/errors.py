"""The error of a Hugging Face checkpoint that ``megadistill convert-hf`` cannot convert."""

from __future__ import annotations

from megadistill.config import ConfigError


class ConversionError(ConfigError):
    """A Hugging Face checkpoint that cannot be converted, naming the file and key."""


class ExportError(ConfigError):
    """A student checkpoint that ``megadistill export-hf`` cannot export, naming the file, key or
    option."""
