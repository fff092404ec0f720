"""Reading a Hugging Face checkpoint directory: its ``config.json`` and where each tensor is
(``model.safetensors``, or the shards ``model.safetensors.index.json`` lists). Tensors are read
one at a time, when asked for. A directory that is not such a checkpoint (no ``config.json``,
weights only as ``*.bin`` / ``*.pt``, a shard the index lists missing) is refused with a
``ConversionError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from megadistill.hf.errors import ConversionError

if TYPE_CHECKING:
    import torch

PathLike = Union[str, Path]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint directory: its ``config.json`` and where each tensor is."""

    directory: Path
    config: dict
    """``config.json`` as a dict."""
    weight_map: dict
    """Tensor name -> safetensors file (under ``directory``)."""

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its safetensors file. safetensors (0.8) maps it privately
        from the file rather than copying it: its pages are read (and count as resident) when
        touched, and stay the file's page cache until something writes to it."""
        from safetensors import safe_open

        file = self.directory / self.weight_map[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError)
            raise ConversionError(f"{file}: cannot read tensor {name} ({err})") from err

    def shape(self, name: str) -> tuple:
        from safetensors import safe_open

        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())


def read_checkpoint(path: PathLike) -> HFCheckpoint:
    """Read ``config.json`` and the tensor index of the Hugging Face checkpoint directory ``path``
    (``model.safetensors``, or the shards ``model.safetensors.index.json`` lists)."""
    from safetensors import safe_open

    d = Path(path)
    if not d.is_dir():
        what = "is a file" if d.is_file() else "is not a directory" if d.exists() else "does not exist"
        raise ConversionError(f"{d} {what}: not a Hugging Face checkpoint directory (config.json + safetensors)")
    config = _read_json(d / CONFIG_FILE)
    if (d / SAFETENSORS_INDEX).is_file():
        index = _read_json(d / SAFETENSORS_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{d / SAFETENSORS_INDEX}: no weight_map")
        for file in sorted(set(weight_map.values())):
            if not (d / file).is_file():
                raise ConversionError(f"{d / SAFETENSORS_INDEX} lists {file}, which is missing from {d}")
    elif (d / SAFETENSORS_FILE).is_file():
        try:
            with safe_open(str(d / SAFETENSORS_FILE), framework="pt") as f:
                weight_map = {k: SAFETENSORS_FILE for k in f.keys()}
        except Exception as err:
            raise ConversionError(f"{d / SAFETENSORS_FILE} is not a safetensors file ({err})") from err
    else:
        others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        hint = f" ({', '.join(others[:3])} found: re-save it with save_pretrained(safe_serialization=True))" if others else ""
        raise ConversionError(f"{d} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}{hint}")
    return HFCheckpoint(d, config, weight_map)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ConversionError(f"{file} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConversionError(f"{file} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{file} is not a JSON object")
    return data
