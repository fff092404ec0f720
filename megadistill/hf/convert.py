"""Hugging Face Llama / Qwen2 / Qwen3 / Mistral checkpoints -> megadistill teacher checkpoints: the
``convert-hf`` command's steps in order, and the writing of their result.

``megadistill convert-hf PATH --output DIR`` reads a Hugging Face checkpoint directory
(``config.json`` and ``model.safetensors``, or shards listed by ``model.safetensors.index.json``;
:mod:`megadistill.hf.read`), maps its architecture onto ``teacher.model``
(:mod:`megadistill.hf.architecture`) and its tensors onto megatron-core's
(:mod:`megadistill.hf.weights`), and writes the equivalent megatron-core ``GPTModel`` as a
teacher checkpoint, the layout training writes: ``DIR/step_00000000/`` is a complete
megatron-core distributed checkpoint with its ``COMPLETE`` marker (file checksums, the
``teacher.model`` architecture and the tokenizer's SHA-256, which a run checks its
``teacher.model`` and tokenizer against), so ``teacher.checkpoint: DIR`` loads it resharded at
any TP/PP. ``DIR/teacher.yaml`` holds the matching ``teacher`` block and ``data.tokenizer_*``
lines.

Vocabulary: the embedding and output layer get ``padded_vocab_size(V_tok, 1, D)`` rows, the padded
vocabulary of a run at TP=1 whose tokenizer has ``V_tok`` ids and ``make_vocab_size_divisible_by:
D``; the marker records ``V_tok`` (``vocab_size``), which lets the checkpoint load at any TP, whose
padding differs (:mod:`megadistill.megatron.teacher`).

Memory: tensors are read from the safetensors files one at a time and converted into one state dict
(:func:`megadistill.hf.weights.convert_state_dict`); the ``GPTModel`` whose checkpoint is written
takes those very tensors as its parameters (built on the meta device, :func:`_model_of`), so the
conversion holds the model about once (``bench/convert_memory.py`` measures it).

Whatever cannot be converted is refused with a ``ConversionError`` (:mod:`megadistill.hf.errors`)
naming the file and key.

``DIR`` is never written over: a ``DIR`` that holds anything (an earlier conversion, even of the same
model, or other files; only earlier ``superseded-*`` directories do not count) is refused before any
work, unless ``overwrite`` is set, which moves its contents into ``DIR/superseded-<UTC time>/``
(:func:`megadistill.checkpoint_dir.move_aside`, as ``megadistill train --overwrite`` does) just
before the new conversion is written. Nothing is deleted. While it writes, a conversion holds
``DIR/.convert-hf.lock`` (created exclusively), so two conversions never write into one ``DIR``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from megadistill.checkpoint_dir import SUPERSEDED, checkpoint_path, move_aside
from megadistill.config import ModelConfig, padded_vocab_size, to_dict
from megadistill.hf.architecture import TeacherArchitecture, model_config
from megadistill.hf.errors import ConversionError
from megadistill.hf.output import check_output_path
from megadistill.hf.read import CONFIG_FILE, PathLike, read_checkpoint
from megadistill.hf.weights import convert_state_dict

SNIPPET_FILE = "teacher.yaml"
LOCK_FILE = ".convert-hf.lock"

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class ConversionResult:
    """What :func:`convert` wrote."""

    checkpoint: Path
    """The complete checkpoint directory (``DIR/step_00000000``)."""
    snippet: Path
    """``DIR/teacher.yaml``."""
    snippet_text: str
    model: ModelConfig
    """``teacher.model``."""
    vocab_rows: int
    """Rows of the embedding and output layer (the run's padded vocabulary)."""
    tokenizer: Optional[str]
    tokenizer_type: Optional[str]
    tokenizer_vocab_size: Optional[int]
    superseded: Optional[Path] = None
    """Where ``overwrite`` moved the output directory's earlier contents (None: it held none)."""


def find_tokenizer(directory: PathLike) -> tuple[Optional[str], Optional[str]]:
    """``(path, type)`` of the tokenizer inside a Hugging Face checkpoint directory: the directory
    itself when it holds a ``tokenizer.json``, else its sentencepiece ``tokenizer.model``; else
    ``(None, None)``."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return str(d), "huggingface"
    if (d / "tokenizer.model").is_file():
        return str(d / "tokenizer.model"), "sentencepiece"
    return None, None


def convert(
    source: PathLike,
    output: PathLike,
    *,
    model_type: Optional[str] = None,
    tokenizer: Optional[PathLike] = None,
    tokenizer_type: Optional[str] = None,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert the Hugging Face checkpoint ``source`` into a teacher checkpoint under ``output``.

    ``tokenizer`` (default: the one inside ``source``, see :func:`find_tokenizer`) is the
    student's: its vocabulary size ``V_tok`` fixes the padded vocabulary, ``padded_vocab_size(V_tok,
    1, make_vocab_size_divisible_by)`` (a run at another TP pads it otherwise and loads it all the
    same), and it and its SHA-256 go into the marker.
    ``dtype`` (fp32, bf16, fp16) is the checkpoint's (default: ``config.json``'s ``dtype`` /
    ``torch_dtype``, else fp32); a teacher is cast to ``teacher.model.precision`` as it loads.
    ``output`` must be new or empty; ``overwrite`` moves what it holds aside instead (module
    docstring). One process (it starts and ends its own one-rank process group unless one exists).
    """
    from megadistill.data.tokenizer import guess_tokenizer_type, load_tokenizer

    out = Path(output)
    _check_output(out, overwrite)  # before any work
    ckpt = read_checkpoint(source)
    arch = model_config(ckpt.config, model_type, str(ckpt.directory / CONFIG_FILE))
    d = make_vocab_size_divisible_by
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by must be a positive integer, got {d!r}")
    if tokenizer is None:
        tokenizer, found_type = find_tokenizer(ckpt.directory)
        tokenizer_type = tokenizer_type or found_type
    elif tokenizer_type is None:
        tokenizer_type = guess_tokenizer_type(tokenizer)
    tok = load_tokenizer(tokenizer, tokenizer_type) if tokenizer is not None else None
    if tok is not None and tok.vocab_size > arch.hf_vocab_size:
        raise ConversionError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but {ckpt.directory / CONFIG_FILE} "
                              f"vocab_size is {arch.hf_vocab_size}: ids past it have no embedding")
    base_vocab = tok.vocab_size if tok is not None else arch.hf_vocab_size
    rows = padded_vocab_size(base_vocab, 1, make_vocab_size_divisible_by)
    precision = _DTYPES.get(dtype or ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32")
    if precision is None:
        raise ConversionError(f"dtype {dtype or ckpt.config.get('dtype') or ckpt.config.get('torch_dtype')!r} is not fp32, "
                              "bf16 or fp16 (--dtype)")
    teacher = replace(arch.model, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    from megadistill.megatron.checkpoint import version_marker
    from megadistill.megatron.gpt import DTYPES

    state = convert_state_dict(ckpt, replace(arch, model=teacher), rows, DTYPES[precision])

    marker = {
        "backend": "megatron",
        "config": {"model": to_dict(teacher)},
        "tokenizer_sha256": tok.sha256 if tok is not None else None,
        # The real rows (the ids the tokenizer produces): a run at any TP tells padding by it.
        "vocab_size": base_vocab,
        "converted_from": {
            "format": "huggingface", "model_type": arch.model_type, "path": str(ckpt.directory.resolve()),
            "files": {name: (ckpt.directory / name).stat().st_size for name in sorted(set(ckpt.weight_map.values()))},
            "hf_vocab_size": arch.hf_vocab_size, "vocab_rows": rows, "dtype": precision,
        },
        **version_marker(),  # the megatron-core that wrote it (0.19's format is not 0.16's)
    }
    text = snippet(out, teacher, arch, rows, tokenizer, tokenizer_type, tok.vocab_size if tok is not None else None,
                   ckpt.directory)
    from megadistill.megatron.one_process import one_process_group

    with _claim(out, overwrite) as superseded, one_process_group("convert-hf"):
        try:
            path = _write(out, teacher, precision, rows, state, marker)
        except BaseException as e:
            # The half-written step directory is this conversion's own (it holds the lock): remove
            # it, so that OUTPUT holds nothing new and a retry needs no --overwrite.
            step = checkpoint_path(out, 0)
            shutil.rmtree(step.with_name(step.name + ".tmp"), ignore_errors=True)  # commit's name for it
            if isinstance(e, RuntimeError) and isinstance(e.__cause__, OSError):
                # commit's agreement between ranks wraps a file system error: one line
                raise ConversionError(f"--output {out}: {e}") from e
            raise
        snippet_path = out / SNIPPET_FILE
        tmp = snippet_path.with_name(f".{SNIPPET_FILE}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, snippet_path)
    return ConversionResult(path, snippet_path, text, teacher, rows, None if tokenizer is None else str(tokenizer),
                            tokenizer_type if tokenizer is not None else None, tok.vocab_size if tok is not None else None,
                            superseded)


_NEW_OUTPUT = "give a new --output, or pass --overwrite to move them aside into {}/superseded-<UTC time>/"


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse, in one line naming the path, an ``--output`` that cannot be a new conversion's
    directory: a file, one below a file, one that cannot be created or written, or (without
    ``overwrite``) one that holds anything."""
    check_output_path(out, ConversionError)
    held = _contents(out)
    if held and not overwrite:
        raise ConversionError(f"--output {out} already holds {_describe(held)}: {_NEW_OUTPUT.format(out)}")


def _contents(out: Path) -> list[Path]:
    """What ``out`` holds, earlier ``superseded-*`` directories aside."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if not (SUPERSEDED.match(p.name) and p.is_dir() and not p.is_symlink()))


def _describe(held: list[Path]) -> str:
    names = [p.name for p in held]
    what = "an earlier conversion" if SNIPPET_FILE in names or any(n.startswith("step_") for n in names) else "files"
    return f"{what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


@contextmanager
def _claim(out: Path, overwrite: bool):
    """Make ``out`` this conversion's: create it, move what it holds aside (``overwrite``; else
    refuse, as something may have appeared since :func:`_check_output`), and hold its lock file
    while the body writes. Yields where the earlier contents went (None: there were none)."""
    out.mkdir(parents=True, exist_ok=True)
    held, superseded = _contents(out), None
    if held:
        if not overwrite:
            raise ConversionError(f"--output {out} already holds {_describe(held)}: {_NEW_OUTPUT.format(out)}")
        superseded = move_aside(out, held)
    lock = out / LOCK_FILE
    try:
        with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
            f.write(f"{os.getpid()}\n")
    except FileExistsError:
        raise ConversionError(f"--output {out}: another convert-hf is writing into it ({lock})") from None
    try:
        yield superseded
    finally:
        lock.unlink(missing_ok=True)


def _write(out: Path, teacher: ModelConfig, precision: str, rows: int, state: dict, marker: dict) -> Path:
    """Commit ``state`` as step 0 under ``out``: the checkpoint of the teacher ``GPTModel`` (TP=1,
    local spec) whose parameters are ``state``'s tensors themselves (:func:`_model_of`)."""
    from megatron.core import dist_checkpointing

    from megadistill.checkpoint_dir import commit
    from megadistill.megatron.checkpoint import _layout, install_write_results_queue
    from megadistill.processes import children_die_with_this_process

    model = _model_of(teacher, precision, rows, state)

    def write(tmp: Path) -> None:
        install_write_results_queue()
        with children_die_with_this_process():
            # The writer clones only tensors that are views of a larger storage; the converted
            # tensors own theirs, so it writes them in place (the 0.16 writer's forked children
            # read them copy-on-write).
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))

    return commit(out, 0, write, {"layout": _layout(), **marker})


def _model_of(teacher: ModelConfig, precision: str, rows: int, state: dict):
    """The teacher ``GPTModel`` (TP=1, local spec) whose parameters are the tensors of ``state``
    (each ``[out, in]`` / ``[n]`` in the dtype of ``precision``), not copies of them.

    Built on the meta device (no storage, no random initialisation), then given ``state``'s
    tensors by assignment: the model adds no memory to what ``state`` holds, which a model built
    on the CPU and loaded by copy would double (and its fp32 initialisation triple). Every name,
    shape and dtype must be the model's (a mapping bug otherwise, not the user's input: a
    ``RuntimeError`` naming the keys), and no parameter may stay on the meta device.
    """
    import torch

    from megadistill.config import DataConfig, RunConfig, TeacherConfig
    from megadistill.megatron import gpt

    # The local spec: its state dict names are the ones convert_state_dict writes; the checkpoint
    # layout (megatron-core's sharded names) is the same for Transformer Engine layers.
    built = replace(teacher, precision=precision, transformer_impl="local")
    cfg = RunConfig(teacher=TeacherConfig(mode="online", model=built),
                    data=DataConfig(seq_length=min(built.max_position_embeddings or 128, 128)))
    model = gpt.build_gpt(cfg.teacher.model, cfg, rows, meta=True)  # build_gpt's names and shapes, no storage
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:  # a mapping bug, not the user's input
        raise RuntimeError(f"converted state dict does not fit the GPT model: missing {missing}, unexpected {unexpected}")
    differ = [f"{k} {tuple(state[k].shape)} {state[k].dtype} (model {tuple(v.shape)} {v.dtype})"
              for k, v in own.items() if state[k].shape != v.shape or state[k].dtype != v.dtype]
    if differ:
        raise RuntimeError(f"converted tensors differ from the GPT model's in shape or dtype: {', '.join(differ)}")
    model.load_state_dict(state, strict=False, assign=True)  # _extra_state entries keep the model's own
    left = sorted(k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.is_meta)
    if left:
        raise RuntimeError(f"converted GPT model still has tensors without storage (meta): {left}")
    return model


def snippet(out: Path, teacher: ModelConfig, arch: TeacherArchitecture, rows: int, tokenizer, tokenizer_type,
            tokenizer_vocab: Optional[int], source: Path) -> str:
    """The YAML to merge into a run file: ``teacher`` (mode, checkpoint, model) and the student's
    ``data.tokenizer_*`` and ``model.make_vocab_size_divisible_by``, with comments."""
    import yaml

    base = tokenizer_vocab if tokenizer_vocab is not None else arch.hf_vocab_size
    body = {
        "teacher": {"mode": "online", "checkpoint": str(out.resolve()), "model": to_dict(teacher)},
        "model": {"make_vocab_size_divisible_by": teacher.make_vocab_size_divisible_by},
    }
    if tokenizer is not None:
        body["data"] = {"tokenizer_model": str(Path(tokenizer).resolve()), "tokenizer_type": tokenizer_type}
    lines = [
        f"# megadistill convert-hf {source.resolve()} ({arch.model_type}) -> {out.resolve()}",
        f"# Vocabulary: {base} ids ({'the tokenizer' if tokenizer_vocab is not None else 'config.json vocab_size'}), "
        f"{rows} rows (a multiple of make_vocab_size_divisible_by {teacher.make_vocab_size_divisible_by}); at "
        "any tensor_model_parallel_size the teacher loads with the student's padding (zero rows added, or "
        "padding rows dropped).",
    ]
    if tokenizer is None:
        lines.append("# No tokenizer was found beside the weights: set data.tokenizer_model (and data.tokenizer_type) "
                     "to the teacher's tokenizer.")
    lines += [f"# {n}" for n in arch.notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)
