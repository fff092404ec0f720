"""Training checkpoints (model, optimizer, LR scheduler, RNG, driver state) with megatron-core's
``dist_checkpointing``.

Layout under a checkpoint root::

    root/step_00000300/          a complete checkpoint (torch_dist format + our marker)
        COMPLETE                 written last, before the rename (``megadistill.checkpoint_dir``):
                                 {"step", "layout", "megatron_core" (the version that wrote it),
                                 and the caller's ``marker``}
        metadata.json, .metadata, __*.distcp, and with megatron-core 0.16 common.pt
    root/step_00000400.tmp/      a save in progress, or one that was killed: never loaded

Every rank takes part in :func:`save_checkpoint` and :func:`load_checkpoint` (both are
collective). What is stored:

* ``model`` (or ``model0``, ``model1``, ... for a list of chunks): the unwrapped model's
  ``sharded_state_dict()`` -- for a ``DistillationModel`` the student's alone, under the plain
  GPT key names, so a student checkpoint also loads into a bare GPT model at any TP/PP
  (``load_checkpoint(path, gpt_model, restore_rng=False)``), e.g. as a later run's teacher;
* ``optimizer``: ``optimizer.sharded_state_dict(model_sharded_state_dict, ...)``; the distributed
  optimizer is saved as ``dp_reshardable`` by default (no communication; reshardable along DP
  only) or ``fully_reshardable`` (gathered over DP on save; loads at any TP/PP/DP); built and
  restored by :mod:`megadistill.megatron.optimizer_state`, which holds every workaround of
  megatron-core's optimizer checkpointing;
* ``opt_param_scheduler``: ``OptimizerParamScheduler.state_dict()``;
* ``rng_state``: one ``ShardedObject`` per *global rank* (python, numpy, torch CPU, torch CUDA and
  megatron's model-parallel RNG tracker states), restored on the same rank when the checkpoint
  is loaded by the same world size and TP/PP layout (otherwise skipped with a warning);
* ``extra``: a small picklable dict of the caller's state (the training driver keeps its run
  record, config and teacher checkpoint, in the ``COMPLETE`` marker instead, readable without
  megatron). It must be identical on every rank: rank 0's copy is the one saved.

A save goes to ``step_XXXXXXXX.tmp``; after every rank finished writing, the ranks checksum the
files, rank 0 writes the ``COMPLETE`` marker, renames the directory to ``step_XXXXXXXX`` and fsyncs
(``checkpoint_dir.commit``; :func:`write_checkpoint` writes the same state without it). A save
killed before the rename leaves only the ``.tmp`` directory, which
``checkpoint_dir.latest_checkpoint`` ignores (it returns only directories with the marker) and the
next save of that step removes. The checkpoint root must be on a file system every rank sees (as
for Megatron-LM). :func:`load_checkpoint` verifies every file against its checksum before
megatron-core reads any (``checkpoint_dir.verify``), and an error megatron-core or torch raise
while reading names the file.

megatron-core 0.16's writer forks one process per write bucket for every save; they die with the
rank (``megadistill.processes.children_die_with_this_process``); 0.19's writes from threads. Its
results queue would be a *spawn*-context ``Manager``, a server process per rank that outlives a rank
killed with SIGKILL: a fork-context queue is installed instead (:func:`install_write_results_queue`).

Across megatron-core versions (``megadistill._compat``): 0.16 keeps the common (non-tensor) state
in ``common.pt``; 0.19 keeps it as an object inside the ``__*.distcp`` files and writes no
``common.pt``. 0.19 reads both kinds (a 0.16 checkpoint resumes under 0.19 with the same losses);
0.16 cannot read 0.19's, and :func:`load_checkpoint` (and the teacher's loader) refuses one with
:class:`IncompatibleCheckpointError`, naming both versions, before megatron-core tries.

Exact resume: build model -> DDP -> optimizer -> scheduler exactly as for a fresh run, call
:func:`load_checkpoint`, and continue with step ``extra["step"] + 1`` at the saved data position.
The per-step losses and grad norms then equal an uninterrupted run's bit for bit, dropout
included (tests/megatron/test_checkpoint.py). Loading only the model (``optimizer=None``) into a run that
has a mixed-precision optimizer leaves its fp32 main params stale: pass the optimizer too, or
call ``optimizer.reload_model_params()``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.queues
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CONFIG_FNAME, maybe_load_config
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.utils import unwrap_model

from megadistill import _compat, rng
from megadistill.checkpoint_dir import COMPLETE_MARKER, commit, verify
from megadistill.config import ConfigError
from megadistill.megatron.optimizer_state import (
    check_learning_rates,
    is_distributed_optimizer,
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from megadistill.processes import children_die_with_this_process

logger = logging.getLogger(__name__)

FORMAT = "megadistill-checkpoint"
FORMAT_VERSION = 1
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")  # optimizer tensors in a checkpoint
_META_KEY = "megadistill"
_OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
_MCORE_KEY = "megatron_core"  # the marker's (and the common state's) record of the writing megatron-core
_COMMON_STATE_OBJECT = "common_state"  # megatron-core >= 0.17: the common state, inside the torch_dist files


class IncompatibleCheckpointError(ConfigError):
    """A checkpoint written by a megatron-core whose format the installed one cannot read."""


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer,
    scheduler=None,
    extra: Optional[dict] = None,
    *,
    optimizer_sharding: str = "dp_reshardable",
    marker: Optional[dict] = None,
) -> Path:
    """Save a training checkpoint for ``step`` under ``root``; returns its directory.

    Collective: every rank must call it with the same ``step``. ``model`` is the DDP-wrapped model
    (or a list of model chunks), ``optimizer`` a megatron optimizer (distributed or not, or None),
    ``scheduler`` an ``OptimizerParamScheduler`` or None. ``extra`` must be picklable, small and
    the same on every rank (rank 0's copy is saved); each rank's RNG states are saved separately.
    ``optimizer_sharding`` is the distributed optimizer's format: ``"dp_reshardable"`` (the
    default; a later load may change the DP size only) or ``"fully_reshardable"`` (any layout).
    ``marker`` (JSON-serialisable) is added to the ``COMPLETE`` marker (``checkpoint_dir.commit``).
    """
    state = _training_state(step, model, optimizer, scheduler, extra, optimizer_sharding)
    recorded = {"layout": _layout(), **version_marker(), **(marker or {})}
    return commit(root, step, lambda tmp: _save(state, tmp), recorded)


def version_marker() -> dict:
    """``{"megatron_core": <installed version>}``: what a checkpoint's ``COMPLETE`` marker records
    of the megatron-core that wrote it (``save_checkpoint`` adds it; a caller that commits
    :func:`write_checkpoint` itself adds it to its marker), so that another version can tell
    whether it reads the format, without reading the checkpoint."""
    return {_MCORE_KEY: _compat.installed_version()}


def write_checkpoint(directory: str | Path, step: int, model, optimizer, scheduler=None, extra: Optional[dict] = None,
                     *, optimizer_sharding: str = "dp_reshardable") -> None:
    """Write the same state as :func:`save_checkpoint` into an existing empty ``directory``, with no
    commit protocol (for callers that commit it themselves, as ``megadistill.checkpoint_dir``)."""
    state = _training_state(step, model, optimizer, scheduler, extra, optimizer_sharding)
    _save(state, Path(directory))


def _save(state: dict, directory: Path) -> None:
    install_write_results_queue()
    with children_die_with_this_process():  # megatron-core's writer processes
        dist_checkpointing.save(state, str(directory))


def _training_state(step: int, model, optimizer, scheduler, extra: Optional[dict], optimizer_sharding: str) -> dict:
    """The sharded state dict of a training checkpoint (built and validated before any write)."""
    if optimizer_sharding not in _OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {_OPTIMIZER_SHARDINGS}, got {optimizer_sharding!r}")
    extra = dict(extra or {})
    if "step" in extra and extra["step"] != step:
        raise ValueError(f"extra['step'] = {extra['step']} disagrees with step = {step}")
    chunks = _model_chunks(model)
    state: dict[str, Any] = {}
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        state[key] = chunk.sharded_state_dict()
    # Chunks name their modules alike (each its own decoder.layers.0, ...): the optimizer gets them
    # nested by chunk, as Megatron-LM passes them.
    model_state = state["model"] if len(chunks) == 1 else {k: state[k] for k in _chunk_keys(len(chunks))}
    if optimizer is not None:
        state["optimizer"] = optimizer_sharded_state_dict(optimizer, model_state, False, optimizer_sharding)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object(rng.get_state())
    state["extra"] = extra
    state[_META_KEY] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "layout": _layout(),
        "model_chunks": len(chunks),
        "has_optimizer": optimizer is not None,
        "has_scheduler": scheduler is not None,
        "optimizer_sharding": optimizer_sharding if is_distributed_optimizer(optimizer) else None,
        _MCORE_KEY: _compat.installed_version(),
    }
    return state


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, *, restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``extra`` plus ``step``.

    Collective. Restores the model weights (resharded to this run's TP/PP), and when given, the
    optimizer state, the scheduler and -- for the same world size and TP/PP layout -- this rank's
    RNG states. Build ``model``, DDP, ``optimizer`` and ``scheduler`` exactly as for a fresh run
    first (the optimizer must not have stepped; the scheduler must be new). Raises
    ``FileNotFoundError`` for a missing or incomplete checkpoint,
    ``checkpoint_dir.CorruptCheckpointError`` (naming the files) when its files are not the ones
    saved, :class:`IncompatibleCheckpointError` (a ValueError) when the installed megatron-core
    cannot read the format of the one that wrote it, and ``ValueError`` when the model (or, for
    ``dp_reshardable``, the TP/PP layout; or the optimizer's ``lr``/``min_lr``) does not match the
    checkpoint or a file cannot be read (naming it).
    ``restore_rng=False`` leaves the RNG states alone (e.g. to load weights only, for a new run).
    ``model`` may also be a bare (unwrapped) model: e.g. a student checkpoint loaded as a teacher.
    """
    path = Path(path)
    marker = verify(path)  # before megatron-core reads anything; agreed on every rank
    check_readable_format(path, marker)
    with _reading(path / CONFIG_FNAME):
        if maybe_load_config(str(path)) is None:
            raise FileNotFoundError(f"{path / CONFIG_FNAME} is missing")
    common_file = path / COMMON_STATE_FNAME
    if common_file.is_file():
        reading = _reading(common_file)
    else:  # megatron-core >= 0.17 keeps the common state inside the torch_dist files
        with _reading(path / ".metadata"):  # their index first: a bad one is named as such
            _dcp_index(path)
        reading = _reading(path, f"the common state ('{_COMMON_STATE_OBJECT}' in __*.distcp)")
    with reading, single_process_reads():
        common = dist_checkpointing.load_common_state_dict(str(path))
    meta = common.get(_META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megadistill training checkpoint")
    if meta["version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {meta['version']}, newer than {FORMAT_VERSION}")

    # The chunks may differ in number (a run resumed with or without the interleaved schedule): the
    # tensors are matched by their global keys (layers by global number), checked just below.
    chunks = _model_chunks(model)
    layout = _layout()
    saved_layout = meta["layout"]

    request: dict[str, Any] = {}
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        request[key] = chunk.sharded_state_dict()
    model_state = request["model"] if len(chunks) == 1 else {k: request[k] for k in _chunk_keys(len(chunks))}
    _check_model_matches(path, model_state)

    if optimizer is not None:
        if not meta["has_optimizer"]:
            raise ValueError(f"{path} holds no optimizer state")
        sharding = meta["optimizer_sharding"]
        if is_distributed_optimizer(optimizer) != (sharding is not None):
            raise ValueError(
                f"{path} was saved with {'a distributed' if sharding else 'a non-distributed'} optimizer; "
                "this run uses the other kind: set use_distributed_optimizer as when saving"
            )
        if sharding == "dp_reshardable" and meta["model_chunks"] != len(chunks):
            raise ValueError(
                f"{path} stores the distributed optimizer as 'dp_reshardable', keyed by the gradient buckets of "
                f"{meta['model_chunks']} model chunk(s); this run has {len(chunks)} (a change of "
                "parallel.virtual_pipeline_model_parallel_size): resume with the saved schedule, or save the run with "
                "checkpoint.optimizer_sharding=fully_reshardable to change it"
            )
        if sharding == "dp_reshardable" and (saved_layout["tp"], saved_layout["pp"]) != (layout["tp"], layout["pp"]):
            raise ValueError(
                f"{path} stores the distributed optimizer as 'dp_reshardable', which loads only with the "
                f"same tensor/pipeline-parallel sizes (saved TP={saved_layout['tp']} PP={saved_layout['pp']}, "
                f"now TP={layout['tp']} PP={layout['pp']}): resume with the saved sizes, or save the run with "
                "checkpoint.optimizer_sharding=fully_reshardable (save_checkpoint(optimizer_sharding=...) in "
                "code) to change them"
            )
        request["optimizer"] = optimizer_sharded_state_dict(optimizer, model_state, True, sharding or "")
    if scheduler is not None and not meta["has_scheduler"]:
        raise ValueError(f"{path} holds no LR scheduler state")
    same_layout = saved_layout == layout
    restore_rng = restore_rng and same_layout
    if restore_rng:
        request["rng_state"] = _rng_sharded_object(None)
    elif not same_layout:
        logger.warning(
            "checkpoint %s was saved with layout %s, this run has %s: RNG states are not restored",
            path, saved_layout, layout,
        )

    with _reading(path, "the tensors and objects (__*.distcp, .metadata)"), single_process_reads():
        loaded = dist_checkpointing.load(request, str(path))

    if optimizer is not None:  # before megatron-core's optimizer load, which fails obscurely (0.19) or not at all (0.16)
        check_learning_rates(optimizer, loaded["optimizer"], f"checkpoint {path}")
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None:
        # OptimizerParamScheduler.load_state_dict *adds* the saved step count to its own.
        scheduler.num_steps = 0
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if restore_rng:
        rng.set_state(loaded["rng_state"])  # last: nothing after it may draw random numbers
    return {**loaded["extra"], "step": meta["step"]}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def check_readable_format(path: str | Path, marker: Optional[dict] = None) -> None:
    """Raise :class:`IncompatibleCheckpointError`, one line naming both versions, if the checkpoint
    directory ``path`` was written by a megatron-core whose format the installed one cannot read:
    one without ``common.pt`` (written by 0.17 or later), read by 0.16. The writer's version is
    the one the ``COMPLETE`` marker records (``marker``; read from ``path`` when not given), else
    the format tells only "0.17 or later". Anything else -- a readable checkpoint, or a directory
    that is no torch_dist checkpoint at all -- passes, for the reader to report."""
    path = Path(path)
    installed = _compat.installed_version()
    if _compat.reads_checkpoint_without_common_pt(installed) or (path / COMMON_STATE_FNAME).is_file():
        return
    if not _holds_common_state_object(path):
        return  # not the newer format: a missing common.pt is reported by the reader (or verify) as before
    if marker is None:
        marker = _marker_or_nothing(path)
    writer = marker.get(_MCORE_KEY)
    written_by = f"megatron-core {writer}" if writer else "megatron-core 0.17 or later"
    raise IncompatibleCheckpointError(
        f"checkpoint {path} was written by {written_by}, which keeps its common state inside __*.distcp "
        f"instead of common.pt; the installed megatron-core {installed} cannot read that format: load it with "
        f"megatron-core {_compat.SUPPORTED[-1]}.x (or any from 0.17 on)"
    )


@contextmanager
def single_process_reads():
    """Without torch DCP's two warnings for a read that is single-process by design: megatron-core
    0.19 reads the common state on each rank alone (``no_dist=True``; in ``load_common_state_dict``
    and at the start of every ``dist_checkpointing.load``), and torch warns, every time, that it
    assumes a single process and that ``load``'s argument order changed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        warnings.filterwarnings("ignore", message=r"The argument order of load has been changed")
        yield


def _marker_or_nothing(path: Path) -> dict:
    """The ``COMPLETE`` marker of ``path`` as JSON, whatever the directory is called (a teacher's
    need not be ``step_*``), or {} without a readable one: only read for the writer's version."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _holds_common_state_object(path: Path) -> bool:
    """Whether the torch_dist index (``.metadata``) of ``path`` lists megatron-core >= 0.17's
    ``common_state`` object. False when there is no readable index."""
    if not (path / ".metadata").is_file():
        return False
    try:
        keys = _dcp_index(path).state_dict_metadata
    except Exception:  # an unreadable index: the reader names it
        return False
    return any(k == _COMMON_STATE_OBJECT or k.startswith(_COMMON_STATE_OBJECT + "/") for k in keys)


def _dcp_index(path: Path):
    """torch DCP's index of the checkpoint ``path`` (its ``.metadata``: every tensor and object key)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


# torch.load's advice for a file it refuses to unpickle (weights_only=False "will likely succeed")
# is wrong for a corrupt file and unsafe for a foreign one: never passed on.
_UNSAFE_ADVICE = "weights_only"


@contextmanager
def _reading(file: Path, what: str = ""):
    """Re-raise an error megatron-core or torch raise while reading ``file`` (or ``what`` of a
    checkpoint directory) as a ValueError naming it. torch's DCP raises ``CheckpointException``,
    a BaseException."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        if isinstance(e, FileNotFoundError):
            raise
        reason, unsafe = _reason(e)
        if what:  # megatron-core does not say which file: the content may be at fault, or the model
            error = ValueError(
                f"cannot read {what} of checkpoint {file}: a corrupt file, or a checkpoint of another model? ({reason})"
            )
        else:
            error = ValueError(f"cannot read {file}: corrupt or not a megadistill checkpoint ({reason})")
        # The chained original would show torch's advice after all, or (a torch DCP failure, whose
        # text carries each rank's traceback) torch's own weights_only=False call as if it were one.
        if unsafe or _UNSAFE_ADVICE in str(e):
            raise error from None
        raise error from e


def _reason(error: BaseException) -> tuple[str, bool]:
    """A one-line account of ``error`` (per rank for a DCP failure), and whether torch's
    weights_only advice had to be left out."""
    if isinstance(error, CheckpointException):
        parts = [_reason(inner) for inner, _ in error.failures.values()]
        ranks = list(error.failures)
        return "; ".join(f"rank {r}: {text}" for r, (text, _) in zip(ranks, parts)), any(u for _, u in parts)
    message = str(error)
    if _UNSAFE_ADVICE in message:
        return f"{type(error).__name__}: not a file torch.load reads safely{_unpickler_detail(message)}", True
    first = message.strip().splitlines()[0] if message.strip() else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__, False


def _unpickler_detail(message: str) -> str:
    """The first sentence of what torch's safe unpickler objected to ("Unsupported operand 149"),
    without the advice that follows it."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    return f" ({lines[0].split('. ')[0].rstrip('.')})" if found and lines else ""


def _model_chunks(model) -> list:
    """The unwrapped model chunks (DDP / Float16Module removed) whose state is checkpointed."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [unwrap_model(chunk) for chunk in chunks]


def _chunk_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _check_model_matches(path: Path, model_state: dict) -> None:
    """Raise a readable ValueError, on every rank, if the model's tensors differ from the checkpoint's."""
    with _reading(path / ".metadata"):
        saved = dist_checkpointing.load_tensors_metadata(str(path))
    problems = []
    local_keys = set()
    for sh in _sharded_tensors(model_state):
        local_keys.add(sh.key)
        if sh.key not in saved:
            problems.append(f"{sh.key}: missing from the checkpoint")
        elif _shape_differs(tuple(saved[sh.key].global_shape), tuple(sh.global_shape), sh.allow_shape_mismatch):
            problems.append(
                f"{sh.key}: shape {tuple(saved[sh.key].global_shape)} in the checkpoint, "
                f"{tuple(sh.global_shape)} in the model"
            )
    # Gathered, so that every rank raises (or none does) and sees the model's full key set.
    gathered = _all_gather((local_keys, problems))
    wanted = set().union(*(keys for keys, _ in gathered))
    problems = sorted({p for _, rank_problems in gathered for p in rank_problems})
    # Model tensors the checkpoint has but no rank of this model asks for.
    saved_model_keys = {k for k in saved if not _OPTIMIZER_KEY.match(k)}
    problems += [f"{k}: in the checkpoint, not in the model" for k in sorted(saved_model_keys - wanted)]
    if problems:
        shown = "\n  ".join(problems[:30]) + ("\n  ..." if len(problems) > 30 else "")
        raise ValueError(
            f"checkpoint {path} does not match the model ({len(problems)} tensor(s) differ; "
            f"was it saved for another model configuration?):\n  {shown}"
        )


def _shape_differs(saved: tuple, wanted: tuple, padded_rows: bool) -> bool:
    """Megatron marks vocabulary-padded embeddings ``allow_shape_mismatch``: their row count may
    change with the padding (e.g. with the TP size); every other dimension must match."""
    if padded_rows:
        return len(saved) != len(wanted) or saved[1:] != wanted[1:]
    return saved != wanted


def _all_gather(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _sharded_tensors(tree) -> Iterable[ShardedTensor]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _sharded_tensors(value)
    elif isinstance(tree, ShardedTensor):
        yield tree
    # ShardedTensorFactory entries (fused or split weights) are not shape-checked here; their
    # mismatches still fail inside dist_checkpointing.load.


# -- RNG ---------------------------------------------------------------------------------------


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    """This rank's RNG states as entry ``rank`` of a ``[world_size]`` object in the checkpoint."""
    return ShardedObject(
        "megadistill.rng_state",
        state,
        (dist.get_world_size(),),
        (dist.get_rank(),),
        replica_id=0,
    )


# -- dist_checkpointing's write results queue ---------------------------------------------------


class _WriteResultsQueue(multiprocessing.queues.Queue):
    """Fork-context queue for dist_checkpointing's write results.

    megatron-core creates its own lazily from a *spawn*-context ``Manager``: a server process
    per rank (a fresh interpreter, seconds to start) that outlives a rank killed with SIGKILL,
    blocked on a futex. For the synchronous saves made here, the results are put and read back
    by the rank itself (a fork-based async writer would inherit the queue too).
    ``multiprocessing.Queue.put`` returns before a feeder thread has written the item to the
    pipe, so megatron's ``get_nowait()`` right after the save can find it still empty (a few
    saves in a hundred): the item is always on its way by then (the writer finished), so
    ``get_nowait`` waits for it.
    """

    def __init__(self) -> None:
        super().__init__(ctx=multiprocessing.get_context("fork"))

    def get_nowait(self) -> Any:
        return self.get(timeout=60)


def install_write_results_queue() -> None:
    """Give dist_checkpointing a fork-context results queue unless it already has one.
    Idempotent; called before every save (and by the CPU layer)."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = _WriteResultsQueue()
