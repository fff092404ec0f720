"""The frozen teacher: a megatron-core ``GPTModel`` on the student's TP/PP groups.

The teacher has its own ``TransformerConfig`` (layers, hidden size, heads, FFN, architecture
options, precision) but the student's vocabulary and parallel layout. Its precision
(``teacher.model.precision``) is its own: frozen, it needs no fp32 master weights, so it is built
in bf16/fp16 directly and a checkpoint saved in another dtype is cast as it loads. It is frozen (``eval()``, no ``requires_grad``), runs under
``torch.no_grad()``, and is kept outside the student's module tree so that no optimizer, DDP
wrapper or student checkpoint ever sees it. Its weights load from a megatron-core distributed
checkpoint, resharded to the run's TP/PP by ``dist_checkpointing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel

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


def load_teacher_checkpoint(model: GPTModel, checkpoint_dir: str | Path, prefix: str = "") -> GPTModel:
    """Load a megatron-core distributed checkpoint into ``model``, resharded to this run's TP/PP.

    ``prefix`` is the checkpoint's key prefix for the model (e.g. ``"model."``). Raises if the
    directory is missing, its vocabulary differs from the model's, or it was written by a
    megatron-core whose format the installed one cannot read
    (``megadistill.megatron.checkpoint.IncompatibleCheckpointError``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"teacher checkpoint directory {checkpoint_dir} does not exist")
    check_readable_format(checkpoint_dir)  # one written by a newer megatron-core: named, not a confusing read error
    check_same_vocab(model.vocab_size, checkpoint_vocab_size(checkpoint_dir, prefix), f"teacher checkpoint {checkpoint_dir}")
    sharded = model.sharded_state_dict(prefix=prefix)
    with single_process_reads():
        state = dist_checkpointing.load(sharded, str(checkpoint_dir))
    # A training checkpoint also holds optimizer, RNG and driver state: keep the model's keys only.
    state = {k[len(prefix):]: v for k, v in state.items() if k in sharded}
    model.load_state_dict(state, strict=True)
    return model


def save_model_checkpoint(model: GPTModel, checkpoint_dir: str | Path, prefix: str = "") -> None:
    """Save ``model`` as a megatron-core distributed checkpoint (collective over all ranks)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(prefix=prefix), str(checkpoint_dir))


def prepare_teacher(
    teacher: GPTModel, student: GPTModel, checkpoint_dir: Optional[str | Path] = None, prefix: str = ""
) -> GPTModel:
    """Validate ``teacher`` against ``student``, load its weights if a checkpoint is given, freeze it."""
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
        load_teacher_checkpoint(teacher, checkpoint_dir, prefix)
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
