"""Hugging Face Llama / Qwen2 / Mistral checkpoints -> megadistill teacher checkpoints: the
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

Vocabulary: the embedding and output layer get ``padded_vocab_size(V_tok, T, D)`` rows, the padded
vocabulary of a run whose tokenizer has ``V_tok`` ids, ``make_vocab_size_divisible_by: D`` and TP
``T`` (what the student builds: the shapes must agree, and a teacher's vocabulary check is exact).

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
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from megadistill.checkpoint_dir import SUPERSEDED, move_aside
from megadistill.config import ModelConfig, padded_vocab_size, to_dict
from megadistill.hf.architecture import TeacherArchitecture, model_config
from megadistill.hf.errors import ConversionError
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
    tensor_parallel_size: int = 1,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert the Hugging Face checkpoint ``source`` into a teacher checkpoint under ``output``.

    ``tokenizer`` (default: the one inside ``source``, see :func:`find_tokenizer`) is the
    student's: its vocabulary size fixes the padded vocabulary, ``padded_vocab_size(V_tok,
    tensor_parallel_size, make_vocab_size_divisible_by)``, and its SHA-256 goes into the marker.
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
    for name, value in (("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
                        ("--tensor-parallel-size", tensor_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
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
    rows = padded_vocab_size(base_vocab, tensor_parallel_size, make_vocab_size_divisible_by)
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
        "converted_from": {
            "format": "huggingface", "model_type": arch.model_type, "path": str(ckpt.directory.resolve()),
            "files": {name: (ckpt.directory / name).stat().st_size for name in sorted(set(ckpt.weight_map.values()))},
            "hf_vocab_size": arch.hf_vocab_size, "vocab_rows": rows, "dtype": precision,
        },
        **version_marker(),  # the megatron-core that wrote it (0.19's format is not 0.16's)
    }
    text = snippet(out, teacher, arch, rows, tokenizer, tokenizer_type, tok.vocab_size if tok is not None else None,
                   tensor_parallel_size, ckpt.directory)
    with _claim(out, overwrite) as superseded, _one_process_group():
        try:
            path = _write(out, teacher, precision, rows, state, marker)
        except RuntimeError as e:  # commit's agreement between ranks wraps a file system error: one line
            if isinstance(e.__cause__, OSError):
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
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if existing == out and not out.is_dir():
        raise ConversionError(f"--output {out} is {'a file' if out.is_file() else 'not a directory'}: give a directory")
    if not existing.is_dir():
        raise ConversionError(f"--output {out}: {existing} is {'a file' if existing.is_file() else 'not a directory'}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(f"--output {out}: {existing} is not writable")
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
    """Build the teacher ``GPTModel`` (TP=1, local spec), load ``state`` into it (strict: every
    name and shape must be the model's) and commit it as step 0 under ``out``."""
    from megatron.core import dist_checkpointing

    from megadistill.checkpoint_dir import commit
    from megadistill.config import DataConfig, RunConfig, TeacherConfig
    from megadistill.megatron.checkpoint import _layout, install_write_results_queue
    from megadistill.megatron.gpt import build_gpt
    from megadistill.processes import children_die_with_this_process

    # The local spec: its state dict names are the ones convert_state_dict writes; the checkpoint
    # layout (megatron-core's sharded names) is the same for Transformer Engine layers.
    built = replace(teacher, precision=precision, transformer_impl="local")
    cfg = RunConfig(teacher=TeacherConfig(mode="online", model=built),
                    data=DataConfig(seq_length=min(built.max_position_embeddings or 128, 128)))
    model = build_gpt(cfg.teacher.model, cfg, rows)
    own = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:  # a mapping bug, not the user's input
        raise RuntimeError(f"converted state dict does not fit the GPT model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=False)  # _extra_state entries keep the model's own
    del state

    def write(tmp: Path) -> None:
        install_write_results_queue()
        with children_die_with_this_process():
            dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))

    return commit(out, 0, write, {"layout": _layout(), **marker})


@contextmanager
def _one_process_group():
    """A one-rank gloo group with megatron-core's parallel state (TP=PP=1), unless the caller has
    one (then it must be a single rank at TP=PP=1)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megadistill.megatron import cpu

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(f"convert-hf runs as one process, not {dist.get_world_size()} ranks")
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConversionError("convert-hf runs as one process: start it without torchrun/srun")
    with tempfile.TemporaryDirectory(prefix="megadistill-convert-") as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            cpu.apply_if_needed("gloo")
            parallel_state.initialize_model_parallel(1, 1)
            torch.manual_seed(0)
            model_parallel_cuda_manual_seed(0)  # the weights are overwritten; megatron-core needs the tracker
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def snippet(out: Path, teacher: ModelConfig, arch: TeacherArchitecture, rows: int, tokenizer, tokenizer_type,
            tokenizer_vocab: Optional[int], tensor_parallel_size: int, source: Path) -> str:
    """The YAML to merge into a run file: ``teacher`` (mode, checkpoint, model) and the student's
    ``data.tokenizer_*`` and ``model.make_vocab_size_divisible_by``, with comments."""
    import yaml

    base = tokenizer_vocab if tokenizer_vocab is not None else arch.hf_vocab_size
    loads = [t for t in (1, 2, 4, 8, 16) if padded_vocab_size(base, t, teacher.make_vocab_size_divisible_by) == rows]
    body = {
        "teacher": {"mode": "online", "checkpoint": str(out.resolve()), "model": to_dict(teacher)},
        "model": {"make_vocab_size_divisible_by": teacher.make_vocab_size_divisible_by},
    }
    if tokenizer is not None:
        body["data"] = {"tokenizer_model": str(Path(tokenizer).resolve()), "tokenizer_type": tokenizer_type}
    lines = [
        f"# megadistill convert-hf {source.resolve()} ({arch.model_type}) -> {out.resolve()}",
        f"# Vocabulary: {base} ids ({'the tokenizer' if tokenizer_vocab is not None else 'config.json vocab_size'}), "
        f"{rows} rows (a multiple of make_vocab_size_divisible_by {teacher.make_vocab_size_divisible_by} x TP "
        f"{tensor_parallel_size}); the student shares them, which holds at tensor_model_parallel_size "
        f"{', '.join(map(str, loads))}. For another TP, convert again with --tensor-parallel-size.",
    ]
    if tokenizer is None:
        lines.append("# No tokenizer was found beside the weights: set data.tokenizer_model (and data.tokenizer_type) "
                     "to the teacher's tokenizer.")
    lines += [f"# {n}" for n in arch.notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)
