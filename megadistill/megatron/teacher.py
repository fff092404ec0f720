"""The frozen teacher: a megatron-core ``GPTModel`` on the student's TP/PP groups.

The teacher has its own ``TransformerConfig`` (layers, hidden size, heads, FFN, architecture
options, precision) but the student's vocabulary and parallel layout. Its precision
(``teacher.model.precision``) is its own: frozen, it needs no fp32 master weights, so it is built
in bf16/fp16 directly and a checkpoint saved in another dtype is cast as it loads. It is frozen (``eval()``, no ``requires_grad``), runs under
``torch.no_grad()``, and is kept outside the student's module tree so that no optimizer, DDP
wrapper or student checkpoint ever sees it. Its weights load from a megatron-core distributed
checkpoint, resharded to the run's TP/PP by ``dist_checkpointing``.

Vocabulary padding: the embedding and output layer have the run's padded vocabulary, ``V_tok``
(the tokenizer's ids) rounded up to a multiple of ``make_vocab_size_divisible_by`` x TP, so the
same teacher has more or fewer rows at another TP size. A teacher checkpoint loads whatever its
padding, as long as its real rows -- the first ``V_tok`` -- are all there: the model's rows past
the checkpoint's are zero, the checkpoint's rows past the model's are not read (see
:func:`check_teacher_vocab`). ``V_tok`` is the caller's (the run's tokenizer) or the one the
checkpoint's ``COMPLETE`` marker records (:func:`teacher_vocab_size`); knowing neither, the
checkpoint must have the model's rows exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel

from megadistill.checkpoint_dir import is_complete, read_marker
from megadistill.megatron.checkpoint import check_readable_format, single_process_reads

# Keys that carry the vocabulary dimension in a GPT checkpoint, in order of preference.
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_vocab(student_vocab: int, teacher_vocab: int, where: str = "teacher") -> None:
    """Raise unless the teacher's (padded) vocabulary equals the student's."""
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"{where} vocabulary size {teacher_vocab} differs from the student's {student_vocab}; "
            "distillation needs the same tokenizer and the same padded vocabulary "
            "(make_vocab_size_divisible_by x tensor-parallel size)"
        )


def checkpoint_vocab_size(checkpoint_dir: str | Path, prefix: str = "") -> int:
    """Padded vocabulary size recorded in a GPT distributed checkpoint (read from its metadata)."""
    metadata = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    for key in _VOCAB_KEYS:
        if prefix + key in metadata:
            return int(metadata[prefix + key].global_shape[0])
    raise ValueError(
        f"{checkpoint_dir} holds no GPT embedding ({', '.join(prefix + k for k in _VOCAB_KEYS)}); "
        "is it a megatron-core GPT checkpoint?"
    )


def teacher_vocab_size(checkpoint_dir: str | Path, vocab_size: Optional[int] = None) -> Optional[int]:
    """The real (unpadded) vocabulary that the rows of the teacher checkpoint ``checkpoint_dir``
    are checked against (:func:`check_teacher_vocab`), or None where it is unknown.

    ``vocab_size`` (the run's tokenizer's ids) if given, else what the checkpoint's ``COMPLETE``
    marker records: its ``vocab_size`` (``convert-hf`` writes it), or, for a conversion written
    before that, the rows holding the model's own weights (the smaller of
    ``converted_from.hf_vocab_size`` and ``vocab_rows``: at least the tokenizer's, so no row of the
    teacher's is taken for padding). A recorded ``vocab_size`` other than the given one is refused
    (one-line ``ValueError``): the teacher was made for another tokenizer.
    """
    path = Path(checkpoint_dir)
    marker = read_marker(path) if is_complete(path) else {}
    recorded = marker.get("vocab_size") if isinstance(marker.get("vocab_size"), int) else None
    if vocab_size is not None:
        if recorded is not None and recorded != vocab_size:
            raise ValueError(
                f"teacher checkpoint {checkpoint_dir} was made for a tokenizer of {recorded} ids, this run's has "
                f"{vocab_size}; distillation needs the teacher's tokenizer (data.tokenizer_model)"
            )
        return vocab_size
    if recorded is not None:
        return recorded
    converted = marker.get("converted_from")
    if isinstance(converted, dict) and all(isinstance(converted.get(k), int) for k in ("hf_vocab_size", "vocab_rows")):
        return min(converted["hf_vocab_size"], converted["vocab_rows"])
    return None


def check_teacher_vocab(model_rows: int, checkpoint_rows: int, vocab_size: Optional[int], where: str) -> None:
    """Raise a one-line ``ValueError`` naming ``where`` unless a teacher checkpoint of
    ``checkpoint_rows`` vocabulary rows can load into a model of ``model_rows``: the same rows, or,
    with ``vocab_size`` (the tokenizer's ids) known, its real rows ``[0, vocab_size)`` are in both
    (the rows past either are padding: zero in the model where the checkpoint lacks them, left
    unread where it has more)."""
    if model_rows == checkpoint_rows:
        return
    if vocab_size is None:
        raise ValueError(
            f"{where} vocabulary size {checkpoint_rows} differs from the student's {model_rows} and it records no "
            "tokenizer vocabulary size that would tell its padding rows from real ones; distillation needs the same "
            "tokenizer (and then the same padded vocabulary: make_vocab_size_divisible_by x tensor-parallel size)"
        )
    if checkpoint_rows < vocab_size:
        raise ValueError(
            f"{where} has {checkpoint_rows} vocabulary rows but the tokenizer has {vocab_size} ids: rows "
            f"{checkpoint_rows}..{vocab_size - 1} are missing (a teacher of another tokenizer?)"
        )
    if model_rows < vocab_size:
        raise ValueError(f"the teacher model has {model_rows} vocabulary rows, fewer than the {vocab_size} real ones of "
                         f"{where}")


def load_teacher_checkpoint(model: GPTModel, checkpoint_dir: str | Path, prefix: str = "",
                            vocab_size: Optional[int] = None, own_layout: bool = False) -> GPTModel:
    """Load a megatron-core distributed checkpoint into ``model``, resharded to this run's TP/PP.

    ``prefix`` is the checkpoint's key prefix for the model (e.g. ``"model."``). ``vocab_size`` is
    the run's tokenizer's (unpadded) vocabulary, if the caller knows it; the checkpoint's marker may
    record it too (:func:`teacher_vocab_size`). The checkpoint's embedding and output layer may
    have more or fewer padding rows than ``model`` (module docstring); megatron-core reads only the
    rows both have, each rank its own row range of the ``[rows, h]`` weights (its vocabulary-parallel
    weights are marked ``allow_shape_mismatch`` and zeroed before the read), so no rank holds more
    than its share. Raises if the directory is missing, its real vocabulary rows are not all
    present (:func:`check_teacher_vocab`), or it was written by a megatron-core whose format the
    installed one cannot read (``megadistill.megatron.checkpoint.IncompatibleCheckpointError``).

    ``own_layout``: ``model`` was built in a layout of its own (``megadistill.megatron.layout``).
    megatron-core marks its shards' replicas by the parallel state's data-parallel rank, which is
    not that layout's, so its check that each shard has exactly one main replica (a check for
    saving) is skipped; every rank still reads exactly the shards it asks for.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"teacher checkpoint directory {checkpoint_dir} does not exist")
    check_readable_format(checkpoint_dir)  # one written by a newer megatron-core: named, not a confusing read error
    rows = checkpoint_vocab_size(checkpoint_dir, prefix)
    check_teacher_vocab(model.vocab_size, rows, teacher_vocab_size(checkpoint_dir, vocab_size),
                        f"teacher checkpoint {checkpoint_dir}")
    sharded = model.sharded_state_dict(prefix=prefix)
    if rows != model.vocab_size:
        _check_padding_may_differ(sharded)
    with single_process_reads():
        state = dist_checkpointing.load(sharded, str(checkpoint_dir), validate_access_integrity=not own_layout)
    # A training checkpoint also holds optimizer, RNG and driver state: keep the model's keys only.
    state = {k[len(prefix):]: v for k, v in state.items() if k in sharded}
    model.load_state_dict(state, strict=True)
    return model


def _check_padding_may_differ(sharded: dict) -> None:
    """megatron-core marks the vocabulary-parallel weights (this stage's embedding, output layer or
    the last stage's copy of a tied embedding, saved under the embedding's key)
    ``allow_shape_mismatch``, which is what lets their rows differ from the checkpoint's; a release
    that stopped doing so would fail the load with a shape error: say so here instead."""
    unmarked = [k for k, v in sharded.items()
                if k.endswith(_VOCAB_KEYS) and not getattr(v, "allow_shape_mismatch", False)]
    if unmarked:
        raise RuntimeError(f"megatron-core no longer marks {unmarked} allow_shape_mismatch: the vocabulary padding of "
                           "a teacher checkpoint cannot differ from the model's")


def save_model_checkpoint(model: GPTModel, checkpoint_dir: str | Path, prefix: str = "") -> None:
    """Save ``model`` as a megatron-core distributed checkpoint (collective over all ranks)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix=prefix), str(checkpoint_dir))


def prepare_teacher(
    teacher: GPTModel, student: GPTModel, checkpoint_dir: Optional[str | Path] = None, prefix: str = "",
    vocab_size: Optional[int] = None,
) -> GPTModel:
    """Validate ``teacher`` against ``student``, load its weights if a checkpoint is given, freeze it.
    ``vocab_size``: the tokenizer's ids, for :func:`load_teacher_checkpoint`."""
    check_same_vocab(student.vocab_size, teacher.vocab_size)
    for attr in ("pre_process", "post_process"):
        if getattr(teacher, attr) != getattr(student, attr):
            raise ValueError(
                f"teacher and student disagree on {attr} ({getattr(teacher, attr)} vs "
                f"{getattr(student, attr)}): build both for the same pipeline stage"
            )
    if teacher.config.pipeline_model_parallel_size != student.config.pipeline_model_parallel_size:
        raise ValueError("teacher and student must use the same pipeline-parallel size")
    if teacher.config.tensor_model_parallel_size != student.config.tensor_model_parallel_size:
        raise ValueError("teacher and student must use the same tensor-parallel size")
    if checkpoint_dir is not None:
        load_teacher_checkpoint(teacher, checkpoint_dir, prefix, vocab_size)
    speak_stage_dtype(teacher, student.config.pipeline_dtype)
    return freeze(teacher)


def speak_stage_dtype(teacher: GPTModel, stage_dtype: torch.dtype) -> None:
    """Let a teacher whose precision differs from the student's share the student's stage tensors.

    Between pipeline stages the teacher's hidden states ``[s, b, h_teacher]`` travel inside the
    student's tensor, whose dtype is the student's ``pipeline_dtype`` (the schedule allocates its
    receive buffers in it): the teacher's output is cast to it on a non-last stage, and what the
    next stage receives is cast back to the teacher's own dtype before its first layer. No-op when
    both dtypes agree or without pipeline parallelism.
    """
    own = teacher.config.params_dtype
    if own == stage_dtype:
        return
    if not teacher.post_process:
        teacher.register_forward_hook(lambda module, args, out: out.to(stage_dtype))
    if not teacher.pre_process:

        def to_own_dtype(block, args):
            if block.input_tensor is not None:
                block.input_tensor = block.input_tensor.to(own)

        teacher.decoder.register_forward_pre_hook(to_own_dtype)
