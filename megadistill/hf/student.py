"""The student checkpoint ``megadistill export-hf`` reads: which one a path names, what its
``COMPLETE`` marker records (the run, the architecture, the tokenizer's SHA-256), where the run's
tokenizer is, and its weights as one full megatron-core state dict, whichever backend wrote it.

A path names:

- one checkpoint: a complete ``step_*`` directory (its ``COMPLETE`` marker is there), of a run, or
  the ``step_00000000`` of a ``convert-hf`` output;
- a run directory (``output_dir``, whose checkpoints are in ``checkpoints/``) or a checkpoint root
  (a ``convert-hf`` output): its newest complete checkpoint whose files pass their checksums
  (``checkpoint_dir.latest_verified_checkpoint``; a corrupt newer one is skipped with a warning).

The marker's ``config`` is the run's configuration (``convert-hf`` records ``model`` alone): its
``model`` is the architecture, its ``data`` names the tokenizer. The tokenizer is looked for, in
order, at ``--tokenizer``, ``data.tokenizer_model``, beside the run's corpus (``data/corpus.model``
or ``.tokenizer.json`` in the run directory the checkpoint is in, or at ``data.data_prefix``), and
for a converted teacher at its ``teacher.yaml``'s ``data.tokenizer_model`` and beside the Hugging
Face weights it came from; the first whose SHA-256 is the one the marker records is the run's
(without a recorded one, the first found). The checkpoint's files are checked against their
checksums before any is read.

Weights: a Megatron backend checkpoint (a megatron-core distributed checkpoint, any TP/PP) loads
resharded into a TP = 1 model in this process (:func:`megadistill.megatron.full_state.load_full_state`,
in a one-rank process group); a DeepSpeed backend checkpoint is read by
:func:`megadistill.deepspeed.weights.read_student_weights`. Either way the weights are the
model's as the checkpoint holds them (a bf16 student's bf16 weights; ZeRO-3 keeps only the fp32
master copies, which are read), the vocabulary rows padded as saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megadistill.checkpoint_dir import COMPLETE_MARKER, is_complete, latest_verified_checkpoint, read_marker, verify
from megadistill.checkpoint_identity import content_identity
from megadistill.config import DataConfig, ModelConfig
from megadistill.hf.errors import ExportError

if TYPE_CHECKING:
    import torch

CONVERTED_SNIPPET = "teacher.yaml"  # what convert-hf writes beside its checkpoint (megadistill.hf.convert)


@dataclass
class StudentCheckpoint:
    """A complete checkpoint and what its marker records."""

    path: Path
    """The ``step_*`` directory."""
    step: int
    backend: str
    """megatron or deepspeed."""
    model: ModelConfig
    """The architecture, ``precision`` set to the dtype the weights are held in."""
    max_position_embeddings: int
    """``model.max_position_embeddings``, else the run's ``data.seq_length``."""
    run_name: Optional[str]
    run_dir: Optional[Path]
    """The run directory the checkpoint is in (None for a converted teacher or a lone checkpoint)."""
    marker: dict
    """The caller's part of the ``COMPLETE`` marker."""
    identity: dict
    """``checkpoint_identity.content_identity``: the resolved path and content SHA-256."""


def find_checkpoint(path: str | Path) -> StudentCheckpoint:
    """The checkpoint ``path`` names (module docstring), its files verified and its marker read."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist: give a run directory or one of its step_* checkpoints")
    if is_complete(p):
        verify(p)
        ckpt = p
    elif p.name.startswith("step_") and p.is_dir() and not (p / COMPLETE_MARKER).is_file():
        raise ExportError(f"{p} is not a complete checkpoint (no {COMPLETE_MARKER} marker: an interrupted save?); give "
                          "the run directory to export its newest complete checkpoint")
    else:
        found = [latest_verified_checkpoint(root) for root in (p / "checkpoints", p) if root.is_dir()]
        found = [c for c in found if c is not None]
        if not found:
            raise ExportError(f"{p} holds no complete checkpoint (neither {p / 'checkpoints'}/step_* nor {p}/step_* with a "
                              f"{COMPLETE_MARKER} marker)")
        ckpt = found[0]
    return _describe(ckpt)


def _describe(ckpt: Path) -> StudentCheckpoint:
    marker = read_marker(ckpt)
    config = marker.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ExportError(f"{ckpt / COMPLETE_MARKER} records no model architecture (config.model): written outside "
                          "megadistill's training and convert-hf, or by a megadistill before they recorded it")
    model = _model_config(config["model"], ckpt)
    converted = marker.get("converted_from") or {}
    # The dtype the weights were saved in: the model's precision (a student without one trains in
    # fp32), or for a converted teacher the dtype convert-hf wrote.
    model = dataclasses.replace(model, precision=model.precision or converted.get("dtype") or "fp32")
    data = config.get("data") or {}
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    name = config.get("name")
    if name is None and converted:
        name = f"converted {converted.get('model_type', '')} {converted.get('path', '')}".strip()
    return StudentCheckpoint(
        path=ckpt, step=int(marker.get("step", 0)), backend=marker.get("backend", "megatron"), model=model,
        max_position_embeddings=int(model.max_position_embeddings or data.get("seq_length") or DataConfig().seq_length),
        run_name=name, run_dir=run_dir, marker=marker, identity=content_identity(ckpt),
    )


def _model_config(recorded: dict, ckpt: Path) -> ModelConfig:
    """The recorded ``model`` as a ``ModelConfig``: keys it lacks (added to megadistill after it
    was written) keep their defaults, which build the model of that time."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise ExportError(f"{ckpt / COMPLETE_MARKER} records model.{unknown[0]}, which this megadistill does not know "
                          "(written by a newer one?)")
    return ModelConfig(**recorded)


def find_tokenizer(ckpt: StudentCheckpoint, given: Optional[str] = None,
                   given_type: Optional[str] = None) -> tuple[object, str, str]:
    """``(tokenizer, path, type)``: the run's tokenizer (module docstring), loaded. ``given``
    (``--tokenizer``) must be the one the marker records when it records one."""
    from megadistill.data.errors import DataError
    from megadistill.data.tokenizer import guess_tokenizer_type, load_tokenizer

    recorded = ckpt.marker.get("tokenizer_sha256")
    tried = []
    for path, kind in _candidates(ckpt, given, given_type):
        try:
            tok = load_tokenizer(path, kind or guess_tokenizer_type(path))
        except (DataError, FileNotFoundError, OSError) as err:
            if given is not None and path == given:
                raise ExportError(f"--tokenizer {given}: {err}") from err
            continue
        if recorded is None or tok.sha256 == recorded:
            return tok, str(path), kind or guess_tokenizer_type(path)
        if given is not None and path == given:
            raise ExportError(f"--tokenizer {given} is not the tokenizer {ckpt.path} was trained with (sha256 "
                              f"{tok.sha256[:12]}…, the checkpoint records {recorded[:12]}…)")
        tried.append(str(path))
    where = f" ({', '.join(tried)} found, another tokenizer's)" if tried else ""
    raise ExportError(f"{ckpt.path}: the run's tokenizer is not found{where}; give it with --tokenizer"
                      + (f" (sha256 {recorded[:12]}…)" if recorded else ""))


def _candidates(ckpt: StudentCheckpoint, given: Optional[str], given_type: Optional[str]):
    """``(path, type or None)`` where the run's tokenizer may be, in order."""
    if given is not None:
        yield given, given_type
        return
    data = (ckpt.marker.get("config") or {}).get("data") or {}
    kind = data.get("tokenizer_type")
    if data.get("tokenizer_model"):
        yield data["tokenizer_model"], kind
    prefixes = [str(ckpt.run_dir / "data" / "corpus")] if ckpt.run_dir is not None else []
    if data.get("data_prefix"):
        prefixes.append(data["data_prefix"])
    for prefix in prefixes:
        yield prefix + ".model", "sentencepiece"
        yield prefix + ".tokenizer.json", "huggingface"
    snippet = ckpt.path.parent / CONVERTED_SNIPPET
    if snippet.is_file():
        import yaml

        try:
            block = (yaml.safe_load(snippet.read_text(encoding="utf-8")) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError):
            block = {}
        if block.get("tokenizer_model"):
            yield block["tokenizer_model"], block.get("tokenizer_type")
    source = (ckpt.marker.get("converted_from") or {}).get("path")
    if source:
        for name, kind in (("tokenizer.json", "huggingface"), ("tokenizer.model", "sentencepiece")):
            if (Path(source) / name).is_file():
                yield str(Path(source) if kind == "huggingface" else Path(source) / name), kind


def read_weights(ckpt: StudentCheckpoint) -> dict[str, "torch.Tensor"]:
    """The checkpoint's weights as one full state dict (megatron-core local-spec names, padded
    vocabulary rows), whichever backend wrote it (module docstring)."""
    if ckpt.backend == "deepspeed":
        from megadistill.deepspeed.weights import read_student_weights

        try:
            return read_student_weights(ckpt.path, gated=ckpt.model.activation == "swiglu")
        except ValueError as err:
            raise ExportError(str(err)) from err
    if ckpt.backend != "megatron":
        raise ExportError(f"{ckpt.path / COMPLETE_MARKER}: backend {ckpt.backend!r} is not megatron or deepspeed")
    from megadistill.megatron.full_state import load_full_state
    from megadistill.megatron.one_process import one_process_group

    with one_process_group("export-hf"):
        try:
            return load_full_state(ckpt.path, ckpt.model, min(ckpt.max_position_embeddings, 128))
        except ValueError as err:  # megatron-core's or the loader's, naming the checkpoint
            raise ExportError(f"{ckpt.path}: {err}") from err
