"""What a run resumes from: the checkpoint (if any) and the teacher checkpoint, decided on rank 0
and shared, and the settings a resumed run must keep."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megadistill import _compat
from megadistill.checkpoint_dir import (
    COMPLETE_MARKER,
    CorruptCheckpointError,
    is_complete,
    latest_checkpoint,
    move_aside,
    read_marker,
)
from megadistill.checkpoint_identity import content_identity, resolve_teacher_checkpoint, same_content
from megadistill.collective import shareable
from megadistill.config import RESUME_INVARIANTS, ConfigError, ModelConfig, RunConfig, to_dict
from megadistill.data.integrity import read_manifest
from megadistill.hashing import file_sha256
from megadistill.store.format import MANIFEST, StoreError, load_manifest

logger = logging.getLogger(__name__)


ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups", "activation",
    "normalization", "layernorm_epsilon", "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias",
    "rotary_base", "rotary_percent", "rope_scaling_factor", "kv_channels", "qk_layernorm",
)
"""What a teacher's ``teacher.model`` must share with the run that trained its checkpoint (the
shapes, and what changes the function the weights compute: norm, activation, RoPE). A record
written before a key existed holds its default (which builds the model of that time)."""


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else None
    return tree


def _leaf_differences(now, saved, key: str) -> list[str]:
    """Dotted keys under ``key`` whose values differ (``kd.temperature``, not ``kd``)."""
    if isinstance(now, dict) and isinstance(saved, dict):
        out = []
        for k in sorted(set(now) | set(saved), key=str):
            out += _leaf_differences(now.get(k), saved.get(k), f"{key}.{k}")
        return out
    return [] if now == saved else [key]


def resume_mismatches(cfg: RunConfig, saved: Optional[dict]) -> list[str]:
    """Dotted keys whose value differs from the checkpointed run's config (``saved``)."""
    if not saved:
        return []
    now = to_dict(cfg)
    saved = _with_defaults(saved, to_dict(type(cfg)()))
    return [leaf for k in RESUME_INVARIANTS for leaf in _leaf_differences(_lookup(now, k), _lookup(saved, k), k)]


def _with_defaults(saved, defaults):
    """``saved`` (a checkpoint's recorded config) with the keys it lacks -- added to megadistill
    after it was written -- at their defaults, which keep the behaviour of that time."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = dict(saved)
    for k, v in defaults.items():
        out[k] = _with_defaults(saved[k], v) if k in saved else v
    return out


def run_marker(cfg: RunConfig, teacher_checkpoint: Optional[str], tokenizer_sha256: str,
               teacher_identity: Optional[dict] = None, vocab_size: Optional[int] = None) -> dict:
    """What every checkpoint of this run records in its completion marker: enough to check a
    resume against, and to check the checkpoint when it later serves as a teacher.
    ``teacher_identity`` (``Decision.teacher_identity``) is the content of the teacher whose
    targets the run trains on: the online teacher's checkpoint, or the teacher that made the
    offline store's targets. ``vocab_size`` is the tokenizer's ids: the real rows of the
    checkpoint's padded vocabulary, so that as a teacher it loads at a TP size padded otherwise
    (``megadistill.megatron.teacher.teacher_vocab_size``)."""
    return {
        "backend": cfg.optimizer.backend,
        "config": to_dict(cfg),
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_identity": teacher_identity,
        "teacher_store_sha256": _store_identity(cfg),
        "corpus_sha256": corpus_identity(cfg),
        # Which checkpoint format (megatron-core 0.19's has no common.pt, which 0.16 cannot read).
        "megatron_core": _compat.installed_version(),
    }


def corpus_identity(cfg: RunConfig) -> Optional[str]:
    """The training corpus's identity: the sha256 of its .bin/.idx/.model as its manifest records
    them (content only, not paths), for data this project wrote (None for data without one)."""
    import hashlib
    import json

    prefix = cfg.data.data_prefix or str(Path(cfg.output_dir) / "data" / "corpus")
    manifest = read_manifest(prefix)
    if manifest is None:
        return None
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def _store_identity(cfg: RunConfig) -> Optional[str]:
    """The offline store's identity: its manifest (which holds every shard's sha256) hashed; a store
    rebuilt at the same path is another store. The manifest must pass its own checks first
    (its checksum: a hand-edited one is refused, not taken for another store)."""
    if cfg.teacher.mode != "offline":
        return None
    try:
        load_manifest(cfg.teacher.store, f"teacher.store {cfg.teacher.store}")
    except StoreError as e:
        raise ConfigError(str(e)) from e
    return file_sha256(Path(cfg.teacher.store) / MANIFEST)


def store_teacher(cfg: RunConfig, read_files: bool = True) -> Optional[dict]:
    """teacher.mode=offline: the teacher that made ``teacher.store``'s targets, as the store's
    manifest identifies it (``identity.teacher``, with ``recording`` for a recorded store). The run
    records this as its teacher (``run_marker``), whatever ``teacher.checkpoint`` says, so that a
    student's checkpoint never names a teacher that did not make its targets.

    The rule: ``teacher.checkpoint`` may be left out. Given, it must be that teacher by content (a
    copy or a moved checkpoint is; its path does not matter), and ``teacher.model`` must be that
    teacher's architecture (:data:`ARCHITECTURE_KEYS`); anything else is a ConfigError naming both.
    Without ``teacher.checkpoint``, ``teacher.model`` is not compared: an offline run builds no
    teacher, and a section left at its defaults names none. A store recorded by a training run
    (``record_logits``) has that run as its teacher: ``teacher.checkpoint`` must then be the
    checkpoint the recording ended with, by the sha256 of its ``COMPLETE`` marker (which the store
    records, and which holds every file's sha256).

    ``read_files=False`` (preflight, which every rank runs) leaves the content undecided where only
    reading every file of the teacher could decide it (a store written before ``content_sha256``
    existed, or a teacher without checksums); :func:`decide` decides it on rank 0. None when the
    store has no readable manifest: the store's own checks report that."""
    t = cfg.teacher
    if t.mode != "offline" or not t.store:
        return None
    try:
        # Checked (its own checksum, its shard list): a hand-edited teacher identity is refused.
        manifest = load_manifest(t.store, f"teacher.store {t.store}")
    except StoreError:
        return None  # the store's own checks (preflight, the reader) report it
    teacher = ((manifest or {}).get("identity") or {}).get("teacher")
    if not isinstance(teacher, dict):
        return None
    recorded_by_a_run = "recorded_by" in teacher
    recording = manifest.get("recording") or {}
    record = {**teacher, "recording": recording} if recorded_by_a_run else dict(teacher)
    if t.checkpoint is None:
        return record
    ckpt = resolve_teacher_checkpoint(t.checkpoint)
    store = f"teacher.store {t.store}"
    try:
        if recorded_by_a_run:
            _check_recording_run(ckpt, teacher, recording, store)
        else:
            same, want, have = same_content(teacher, ckpt, read_files)
            if same is False:
                raise ConfigError(
                    f"teacher.checkpoint {ckpt} (sha256 {_short(have)}) is not the teacher whose targets {store} holds "
                    f"({teacher.get('path')}, sha256 {_short(want)}): name that teacher (a copy or a moved one will "
                    "do), or leave teacher.checkpoint out"
                )
    except CorruptCheckpointError as e:
        raise ConfigError(f"teacher.checkpoint {ckpt}: {'; '.join(e.problems)}") from e
    model = teacher.get("model")
    if isinstance(model, dict):
        want, have = _architecture(to_dict(t.model)), _architecture(model)
        for k in ARCHITECTURE_KEYS:
            if want[k] != have[k]:
                raise ConfigError(f"teacher.model.{k} is {want[k]} but the teacher whose targets {store} holds has {have[k]}")
    return record


def _check_recording_run(ckpt: Path, teacher: dict, recording: dict, store: str) -> None:
    """``ckpt`` must be the checkpoint the run that recorded ``store`` ended with."""
    run, final, want = teacher["recorded_by"].get("name"), recording.get("final_checkpoint"), \
        recording.get("final_checkpoint_marker_sha256")
    if want is None:
        raise ConfigError(
            f"teacher.checkpoint {ckpt} cannot be checked against {store}: run {run} recorded it while training and "
            "the store names no checkpoint of that run; leave teacher.checkpoint out (the run records the store's teacher)"
        )
    marker = ckpt / COMPLETE_MARKER
    have = file_sha256(marker) if marker.is_file() else None
    if have != want:
        raise ConfigError(
            f"teacher.checkpoint {ckpt} ({COMPLETE_MARKER} sha256 {_short(have)}) is not the teacher whose targets {store} "
            f"holds: run {run} recorded them while training, ending with checkpoint {final} ({COMPLETE_MARKER} sha256 "
            f"{_short(want)}); name that checkpoint (or a copy of it), or leave teacher.checkpoint out"
        )


def _short(digest: Optional[str]) -> str:
    return f"{digest[:12]}…" if digest else "none"


def _architecture(model: dict) -> dict:
    defaults = to_dict(ModelConfig())
    arch = {k: model.get(k, defaults[k]) for k in ARCHITECTURE_KEYS}
    if arch["ffn_hidden_size"] is None and arch["hidden_size"] is not None:
        arch["ffn_hidden_size"] = 4 * arch["hidden_size"]
    if arch["num_query_groups"] is None:
        arch["num_query_groups"] = arch["num_attention_heads"]  # multi-head attention
    return arch


def check_teacher_record(cfg: RunConfig, teacher: str, tokenizer_sha256: str) -> None:
    """A teacher checkpoint written by this project records the architecture and the tokenizer it
    was trained with: ``teacher.model`` and the student's tokenizer must match them."""
    if not is_complete(teacher):
        logger.warning("teacher checkpoint %s records no architecture or tokenizer: neither can be checked", teacher)
        return
    marker = read_marker(teacher)
    model = (marker.get("config") or {}).get("model")
    if model is not None:
        want, have = _architecture(to_dict(cfg.teacher.model)), _architecture(model)
        for k in ARCHITECTURE_KEYS:
            if want[k] != have[k]:
                raise ConfigError(
                    f"teacher.model.{k} is {want[k]} but teacher.checkpoint {teacher} was trained with {have[k]}"
                )
    _check_same_tokenizer(marker, tokenizer_sha256, f"teacher.checkpoint {teacher} was trained with another "
                          "tokenizer than this run's; distillation needs the teacher's tokenizer (data.tokenizer_model)")


def _check_same_tokenizer(marker: dict, tokenizer_sha256: str, problem: str) -> None:
    """Raise ``problem`` (with both hashes) if ``marker`` records another tokenizer than this run's;
    checkpoints that record none cannot be checked."""
    recorded = marker.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer_sha256:
        raise ConfigError(f"{problem} [tokenizer sha256 {recorded[:12]}… recorded, {tokenizer_sha256[:12]}… now]")


def _earlier_run(out: Path, ckpt_root: Path) -> list[str]:
    """What an earlier run left in ``out``: checkpoint directories (complete or not) and logs."""
    found = sorted(p.name for p in ckpt_root.iterdir()) if ckpt_root.is_dir() else []
    found = [f"checkpoints/{name}" for name in found]
    for name in ("metrics.jsonl", "tensorboard"):
        if (out / name).exists():
            found.append(name)
    return found


def _move_aside(out: Path, ckpt_root: Path) -> Path:
    """Move the earlier run's checkpoints and logs into ``out/superseded-<UTC time>/``."""
    return move_aside(out, (ckpt_root, out / "metrics.jsonl", out / "tensorboard"))


def _inside(path: Path, root: Path) -> bool:
    return Path(path).resolve().parent == Path(root).resolve()


@dataclass(frozen=True)
class Decision:
    """Where a run starts: what :func:`decide` chose on rank 0 for every rank."""

    checkpoint: Optional[str]
    """The checkpoint to resume from (None: start afresh)."""
    start_step: int
    """The step the run continues at (the checkpoint's step, 0 afresh)."""
    teacher_checkpoint: Optional[str]
    """The online teacher's checkpoint to load, verified; None without an online teacher, or when
    the run resumes after its KD phase ended (SALT): no teacher is built then."""
    teacher_record: Optional[str]
    """The teacher checkpoint this run distils from, for its checkpoints' run record (kept after
    the KD phase, when it is no longer loaded or needed on disk)."""
    teacher_identity: Optional[dict] = None
    """The content of the teacher whose targets the run trains on, for its checkpoints' run record:
    the online teacher's (``checkpoint_identity.content_identity``), or the store's teacher
    (:func:`store_teacher`); None without a teacher, or where an older run recorded none."""


def decide(
    cfg: RunConfig, ckpt_root: Path, tokenizer_sha256: str, overwrite: bool = False,
    needs_teacher: Callable[[int], bool] = lambda start: True,
) -> Decision:
    """Where the run starts, chosen on rank 0 and shared, so that ranks which list a shared file
    system at different moments still agree. A resumed run keeps the teacher checkpoint it started
    with, even if a newer one has appeared since, and knows it by content: a teacher whose content
    changed is refused, one moved elsewhere is found at ``teacher.checkpoint``
    (:func:`_online_teacher`); one resumed at a step where ``needs_teacher(step)`` is False neither
    loads nor checks it. An offline run's teacher is the store's (:func:`store_teacher`). A run that
    would start afresh over an earlier run's files is refused, unless ``overwrite`` moves them aside
    first."""
    decision: list = [None, None]
    from megadistill.checkpoint_dir import checkpoint_to_resume

    # Collective: every rank checksums its share of the files and all agree, so a corrupt latest
    # checkpoint is skipped (auto) or refused (a path) on every rank alike.
    # --overwrite starts afresh: nothing is resumed (the earlier run is moved aside below).
    chosen = None if overwrite else checkpoint_to_resume(ckpt_root, cfg.checkpoint.resume)
    if dist.get_rank() == 0:
        try:
            path = chosen
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"checkpoint.resume: {path} does not exist")
            _protect_earlier_run(cfg, ckpt_root, path, overwrite)
            marker = read_marker(path) if path else {}
            if path:
                _check_resume(cfg, path, marker, tokenizer_sha256)
            start = int(marker.get("step", 0))
            teacher = record = identity = None
            if cfg.teacher.mode == "online":
                record, identity = marker.get("teacher_checkpoint"), marker.get("teacher_identity")
                if needs_teacher(start):
                    teacher, identity = _online_teacher(cfg, path, marker)
                    record = teacher
                    check_teacher_record(cfg, teacher, tokenizer_sha256)
                else:
                    record = record or cfg.teacher.checkpoint
            elif cfg.teacher.mode == "offline":
                identity = store_teacher(cfg)
            decision = [Decision(str(path) if path else None, start, teacher, record, identity), None]
        except Exception as e:  # raised on every rank below, instead of leaving them waiting
            decision = [None, shareable(e)]
    dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        raise decision[1]
    result = decision[0]
    teacher = result.teacher_checkpoint
    if teacher is not None and is_complete(teacher):
        # Collective (each rank hashes a share): a corrupt teacher would distil wrong targets.
        from megadistill.checkpoint_dir import CorruptCheckpointError, verify

        try:
            verify(teacher)
        except CorruptCheckpointError as e:
            raise ConfigError(f"teacher.checkpoint: {e}") from e
    return result


_NEW_RUN = "use a new output_dir, or pass --overwrite to move the earlier run aside"


def _online_teacher(cfg: RunConfig, resumed_from: Optional[Path], marker: dict) -> tuple[str, Optional[dict]]:
    """The teacher checkpoint an online run loads, and its content identity for the run record.

    Afresh: ``teacher.checkpoint``. Resumed: the teacher the checkpoint recorded, known by its
    content (``teacher_identity``): at the recorded path, or, when that holds other content or
    nothing, at ``teacher.checkpoint`` -- a teacher moved or copied elsewhere is the same teacher.
    Other content is refused (a teacher directory overwritten by another model, say a second
    ``convert-hf`` into the same ``--output``), naming the paths and the recorded and current sha256."""
    if resumed_from is None:
        teacher = str(resolve_teacher_checkpoint(cfg.teacher.checkpoint))
        return teacher, content_identity(teacher)
    recorded_path, recorded = marker.get("teacher_checkpoint"), marker.get("teacher_identity")
    if recorded is None:
        # Written before run markers recorded the teacher's content: the path rule of that time (the
        # recorded path, else teacher.checkpoint), with a warning since the content cannot be checked.
        # This run's checkpoints record the content from now on.
        teacher = recorded_path or str(resolve_teacher_checkpoint(cfg.teacher.checkpoint))
        logger.warning("checkpoint %s records its teacher by path only (written by an older megadistill): the "
                       "teacher checkpoint %s is used without checking that its content is the one the run began "
                       "with", resumed_from, teacher)
        return teacher, content_identity(teacher) if Path(teacher).is_dir() else None
    want = recorded.get("content_sha256") or recorded.get("files_sha256")
    configured = cfg.teacher.checkpoint

    def candidates():
        if recorded_path and Path(recorded_path).is_dir():
            yield recorded_path
        # teacher.checkpoint is looked at only when the recorded path no longer holds the teacher.
        if configured is not None and Path(configured).exists():
            resolved = str(resolve_teacher_checkpoint(configured))
            if not recorded_path or Path(resolved).resolve() != Path(recorded_path).resolve():
                yield resolved

    found = []
    for teacher in candidates():
        same, _, have = same_content(recorded, teacher)
        if same:
            if teacher != recorded_path:
                logger.warning("the teacher checkpoint %s recorded by %s is found by its content at %s: using that",
                               recorded_path, resumed_from, teacher)
            return teacher, {**recorded, "path": str(Path(teacher).resolve())}
        found.append(f"{teacher} holds sha256 {_short(have)}")
    if not found:
        raise ConfigError(
            f"cannot resume from {resumed_from}: its teacher {recorded_path} is gone and teacher.checkpoint "
            f"{configured} does not exist; point teacher.checkpoint at that teacher (sha256 {_short(want)})"
        )
    raise ConfigError(
        f"cannot resume from {resumed_from}: its teacher changed: {'; '.join(found)}, but the run distilled from "
        f"sha256 {_short(want)} ({recorded.get('path')}); restore that teacher, or point teacher.checkpoint at a "
        f"copy of it, or {_NEW_RUN}"
    )


def _protect_earlier_run(cfg: RunConfig, ckpt_root: Path, path: Optional[Path], overwrite: bool) -> None:
    """Never write over, or append to, another run's checkpoints and logs."""
    if path is not None and _inside(path, ckpt_root):
        return  # continuing this output_dir's own run
    out = Path(cfg.output_dir)
    earlier = _earlier_run(out, ckpt_root)
    if not earlier:
        return
    complete = latest_checkpoint(ckpt_root) is not None
    if overwrite or (cfg.checkpoint.resume == "auto" and not complete):
        # With resume=auto and no complete checkpoint, the earlier attempt left nothing to resume:
        # its logs and partial saves are kept aside rather than mixed into this run's.
        aside = _move_aside(out, ckpt_root)
        logger.warning("moved an earlier run's %s aside to %s", ", ".join(earlier), aside)
        return
    what = f"checkpoint.resume={cfg.checkpoint.resume}"
    raise ConfigError(
        f"output_dir {out} holds an earlier run ({', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''}): "
        f"starting with {what} would overwrite or mix with it; {_NEW_RUN}"
    )


def _check_resume(cfg: RunConfig, path: Path, marker: dict, tokenizer_sha256: str) -> None:
    if "config" not in marker:
        raise ConfigError(
            f"cannot resume from {path}: it records no run config to check this run against "
            f"(written outside the training driver, or by an older megadistill); {_NEW_RUN}"
        )
    if marker.get("backend", "megatron") != cfg.optimizer.backend:
        raise ConfigError(
            f"cannot resume from {path}: it was written by the {marker.get('backend')} backend, this run "
            f"uses optimizer.backend={cfg.optimizer.backend}"
        )
    bad = resume_mismatches(cfg, marker.get("config"))
    if bad:
        raise ConfigError(
            f"cannot resume from {path}: these settings differ from the checkpointed run's: "
            f"{', '.join(bad)} ({_NEW_RUN})"
        )
    store = _store_identity(cfg)
    if marker.get("teacher_store_sha256") != store:
        raise ConfigError(
            f"cannot resume from {path}: the logits store teacher.store={cfg.teacher.store} is not the one the "
            f"checkpointed run read (its manifest changed: rebuilt or replaced); {_NEW_RUN}"
        )
    _check_same_tokenizer(marker, tokenizer_sha256, f"cannot resume from {path}: the tokenizer differs from the "
                          f"checkpointed run's (data.tokenizer_model={cfg.data.tokenizer_model}); {_NEW_RUN}")
    corpus, recorded_corpus = corpus_identity(cfg), marker.get("corpus_sha256")
    if recorded_corpus is not None and corpus != recorded_corpus:
        raise ConfigError(
            f"cannot resume from {path}: the training corpus differs from the checkpointed run's (an input "
            f"or the tokenizer changed in content, so it was tokenised again); {_NEW_RUN}"
        )
