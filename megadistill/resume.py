"""What a run resumes from: the checkpoint (if any) and the teacher checkpoint, decided on rank 0
and shared, and the settings a resumed run must keep."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megadistill.checkpoint_dir import is_complete, latest_checkpoint, read_marker, resolve_teacher_checkpoint
from megadistill.collective import shareable
from megadistill.config import RESUME_INVARIANTS, ConfigError, ModelConfig, RunConfig, to_dict
from megadistill.data.integrity import read_manifest
from megadistill.hashing import file_sha256
from megadistill.store.format import MANIFEST

logger = logging.getLogger(__name__)


ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups", "activation",
    "normalization", "layernorm_epsilon", "untie_embeddings_and_output_weights", "add_bias_linear", "add_qkv_bias",
    "rotary_base", "rotary_percent",
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


def run_marker(cfg: RunConfig, teacher_checkpoint: Optional[str], tokenizer_sha256: str) -> dict:
    """What every checkpoint of this run records in its completion marker: enough to check a
    resume against, and to check the checkpoint when it later serves as a teacher."""
    return {
        "backend": cfg.optimizer.backend,
        "config": to_dict(cfg),
        "tokenizer_sha256": tokenizer_sha256,
        "teacher_checkpoint": teacher_checkpoint,
        "teacher_store_sha256": _store_identity(cfg),
        "corpus_sha256": corpus_identity(cfg),
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
    rebuilt at the same path is another store."""
    if cfg.teacher.mode != "offline":
        return None
    return file_sha256(Path(cfg.teacher.store) / MANIFEST)


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
    aside = out / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    while aside.exists():
        aside = aside.with_name(aside.name + "+")
    aside.mkdir(parents=True)
    for p in (ckpt_root, out / "metrics.jsonl", out / "tensorboard"):
        if p.exists():
            os.replace(p, aside / p.name)
    return aside


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


def decide(
    cfg: RunConfig, ckpt_root: Path, tokenizer_sha256: str, overwrite: bool = False,
    needs_teacher: Callable[[int], bool] = lambda start: True,
) -> Decision:
    """Where the run starts, chosen on rank 0 and shared, so that ranks which list a shared file
    system at different moments still agree. A resumed run keeps the teacher checkpoint it started
    with, even if a newer one has appeared since; one resumed at a step where
    ``needs_teacher(step)`` is False neither loads nor checks it. A run that would start afresh
    over an earlier run's files is refused, unless ``overwrite`` moves them aside first."""
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
            teacher = record = None
            if cfg.teacher.mode == "online":
                record = marker.get("teacher_checkpoint")
                if needs_teacher(start):
                    teacher = record = record or str(resolve_teacher_checkpoint(cfg.teacher.checkpoint))
                    check_teacher_record(cfg, teacher, tokenizer_sha256)
                else:
                    record = record or cfg.teacher.checkpoint
            decision = [Decision(str(path) if path else None, start, teacher, record), None]
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
