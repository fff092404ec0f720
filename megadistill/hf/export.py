"""megadistill student checkpoints -> Hugging Face models: the ``export-hf`` command's steps in
order, and the writing of their result.

``megadistill export-hf RUN_OR_CHECKPOINT --output DIR`` finds the checkpoint and reads what its
marker records (:mod:`megadistill.hf.student`), maps the architecture onto a Hugging Face one
(:mod:`megadistill.hf.hf_config`; what none expresses exactly is refused before any weight is
read), reads the weights, whichever backend wrote them, maps them onto that architecture's tensors
(:mod:`megadistill.hf.export_weights`), and writes ``DIR``:

- ``config.json``, ``generation_config.json`` (the end-of-text id);
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
  ``max_shard_bytes``) with ``model.safetensors.index.json`` listing where each tensor is;
- the run's tokenizer (:mod:`megadistill.hf.tokenizer`: a Hugging Face one copied, a sentencepiece
  one wrapped and checked);
- ``megadistill_export.json``: where the model came from -- the run, the checkpoint's path, step,
  backend and content identity (``checkpoint_identity.content_identity``: the SHA-256 of the
  checksum table of its ``COMPLETE`` marker) -- and the export's settings.

The vocabulary is the tokenizer's: the embedding (and output) rows past its ids are the run's
padding, dropped. The weights are written as the checkpoint holds them, cast to ``dtype`` (default:
the model's precision; fp32 for a student without one).

``DIR`` must be new or empty: an export never writes over another export or any other files. It is
written atomically: everything goes into a temporary directory beside ``DIR``
(``.<name>.export-*``), renamed to ``DIR`` once complete, so an export that fails or is killed
leaves no partial ``DIR`` (a killed one leaves only that hidden temporary directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from megadistill.checkpoint_dir import fsync_dir
from megadistill.config import to_dict
from megadistill.hf.errors import ExportError
from megadistill.hf.hf_config import EXPORT_MODEL_TYPES, HF_DTYPES, ExportArchitecture, hf_config
from megadistill.hf.output import check_output_path
from megadistill.hf.student import StudentCheckpoint, find_checkpoint, find_tokenizer, read_weights

SIDECAR = "megadistill_export.json"
FORMAT = "megadistill-hf-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Shards of at most 5 GB (as ``transformers`` 4 writes them)."""


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    output: Path
    checkpoint: StudentCheckpoint
    architecture: ExportArchitecture
    dtype: str
    vocab_size: int
    """Rows written (the tokenizer's ids); the checkpoint's padding rows were dropped."""
    padded_rows: int
    """Rows the checkpoint held."""
    shards: list
    tokenizer_kind: str
    """huggingface (copied) or sentencepiece (wrapped)."""


def export(
    source: str | Path,
    output: str | Path,
    *,
    model_type: Optional[str] = None,
    dtype: Optional[str] = None,
    tokenizer: Optional[str] = None,
    tokenizer_type: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Export the student checkpoint ``source`` (a run directory or one checkpoint) to the Hugging
    Face model directory ``output`` (module docstring). ``model_type``: one of
    ``hf_config.EXPORT_MODEL_TYPES`` (default: a converted teacher's own, else the one the architecture
    implies, ``hf_config.default_model_type``); ``dtype``: fp32,
    bf16 or fp16; ``tokenizer`` / ``tokenizer_type``: the run's tokenizer where the marker's
    records do not lead to it. One process (it starts and ends its own one-rank process group for
    a Megatron checkpoint unless one exists)."""
    from megadistill.megatron.gpt import DTYPES

    out = Path(output)
    _check_output(out)  # before any work
    if dtype is not None and dtype not in HF_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(HF_DTYPES)}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ExportError(f"--max-shard-size must be a positive number of bytes, got {max_shard_bytes!r}")
    ckpt = find_checkpoint(source)
    tok, tok_path, tok_type = find_tokenizer(ckpt, tokenizer, tokenizer_type)
    dtype = dtype or ckpt.model.precision
    if model_type is None:
        # A converted teacher goes back to the architecture it came from.
        converted = (ckpt.marker.get("converted_from") or {}).get("model_type")
        model_type = converted if converted in EXPORT_MODEL_TYPES else None
    # Refused here, before any weight is read, if no architecture computes the student exactly.
    arch = hf_config(ckpt.model, model_type, vocab_size=tok.vocab_size,
                     max_position_embeddings=ckpt.max_position_embeddings, dtype=dtype, eos_token_id=tok.eod,
                     where=f"the student of {ckpt.path}")
    from megadistill.hf.export_weights import hf_state_dict
    from megadistill.hf.tokenizer import write_tokenizer

    with _staging(out) as tmp:
        # The tokenizer first: a sentencepiece wrap that would not encode as training did fails fast.
        written_tok = write_tokenizer(tok, tok_path, tok_type, tmp, ckpt.max_position_embeddings)
        state = read_weights(ckpt)
        padded = _rows(state)
        tensors = hf_state_dict(state, ckpt.model, arch.model_type, tok.vocab_size, DTYPES[dtype], where=str(ckpt.path))
        del state
        shards = _write_tensors(tmp, tensors, max_shard_bytes)
        del tensors
        arch.config["bos_token_id"] = written_tok.bos_token_id
        _write_json(tmp / "config.json", arch.config)
        generation = {"eos_token_id": tok.eod}
        if written_tok.bos_token_id is not None:
            generation["bos_token_id"] = written_tok.bos_token_id
        _write_json(tmp / "generation_config.json", generation)
        _write_json(tmp / SIDECAR, _sidecar(ckpt, arch, dtype, tok, tok_path, tok_type, written_tok, padded, shards))
    return ExportResult(out, ckpt, arch, dtype, tok.vocab_size, padded, shards, written_tok.kind)


def _rows(state: dict) -> int:
    return int(state["embedding.word_embeddings.weight"].shape[0]) if "embedding.word_embeddings.weight" in state else 0


def _write_tensors(directory: Path, tensors: dict, max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` (in their order) as safetensors shards of at most ``max_shard_bytes`` (a
    larger tensor gets a shard of its own) and the index; returns the shard file names."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    files = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({k: tensors[k] for k in names}, str(directory / file), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    _write_json(directory / WEIGHTS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _sidecar(ckpt: StudentCheckpoint, arch: ExportArchitecture, dtype: str, tok, tok_path: str, tok_type: str,
             written_tok, padded: int, shards: list) -> dict:
    """``megadistill_export.json``: the source checkpoint by content, and how it was exported."""
    from megadistill import _compat

    source = {
        "run": ckpt.run_name, "run_dir": str(ckpt.run_dir.resolve()) if ckpt.run_dir is not None else None,
        "checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "backend": ckpt.backend,
        "identity": ckpt.identity, "megatron_core": ckpt.marker.get("megatron_core"),
    }
    if ckpt.marker.get("converted_from"):
        source["converted_from"] = ckpt.marker["converted_from"]
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "source": source,
        "model_type": arch.model_type, "dtype": dtype, "vocab_size": tok.vocab_size, "checkpoint_vocab_rows": padded,
        "model": to_dict(ckpt.model),
        "tokenizer": {"source": str(Path(tok_path).resolve()), "type": tok_type, "sha256": tok.sha256,
                      "written_as": written_tok.kind, "files": written_tok.files,
                      "ids_checked_on_texts": written_tok.checked_texts},
        "weights": shards,
        "megatron_core_installed": _compat.installed_version(),
    }


def _check_output(out: Path) -> None:
    """Refuse, in one line naming it, an ``--output`` that is not new or empty (this refusal first,
    then the checks of the path itself: a file, below a file, not writable)."""

    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held:
            what = "an earlier export" if SIDECAR in held else "files"
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise ExportError(f"--output {out} already holds {what} ({shown}): give a new or empty directory (export-hf "
                              "never writes over one)")
    check_output_path(out, ExportError)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """``with _staging(out) as tmp:`` the body writes into ``tmp``, a new directory beside ``out``;
    on success ``tmp`` is renamed to ``out``, which must still be absent or empty (a rename onto a
    non-empty directory fails: nothing is ever written over); on failure ``tmp`` is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 suits a temporary directory, not the result
    try:
        yield tmp
        _fsync_files(tmp)  # on disk before the rename makes them the output
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--output {out} was filled by something else while exporting ({err.strerror or err}): "
                          "nothing was written into it") from err
    fsync_dir(out.parent)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _fsync_files(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
