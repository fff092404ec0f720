"""Runs the demo's steps, each in a forked process of its own (a clean Megatron state and the
memory handed back between runs), timing each and writing its record.

A step's record (``records/<name>.json``) holds its wall-clock seconds, validation curve and, for
a store, its size; it is written atomically once the step finished, together with the sha256 of
the step's config. A demo started again reuses every step whose record matches its config and
re-runs the rest: a step cut short resumes from its checkpoint (its record then says so), and the
outputs of a step made for another config (an earlier demo's) are moved aside, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path

from megadistill.config import RunConfig, to_dict
from megadistill.demo.runs import Step


class DemoError(RuntimeError):
    """A demo step failed; names the step and where its output is."""


def config_sha256(step: Step, upstream: tuple = ()) -> str:
    """The identity of ``step``'s result: its config, kind and options, and ``upstream``, the
    identities of the steps it reads (``step.uses``: a teacher, a store, scores), so that a step
    whose teacher or store was made again is made again too, even with its own config unchanged."""
    blob = json.dumps({"cfg": to_dict(step.cfg), "kind": step.kind, "options": step.options,
                       **({"upstream": list(upstream)} if upstream else {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def _store_size(store: str, seq_length: int) -> dict:
    from megadistill.store.format import MANIFEST, load_json

    manifest = load_json(Path(store) / MANIFEST)
    total = sum(int(s["bytes"]) for s in manifest["shards"])
    tokens = int(manifest["num_samples"]) * seq_length
    return {"store": str(store), "store_bytes": total, "store_tokens": tokens, "bytes_per_token": total / max(tokens, 1)}


def _execute(step: Step, progress: bool) -> dict:
    """Run ``step`` in this process; its record's contents."""
    cfg: RunConfig = step.cfg
    rec: dict = {}
    t0 = time.perf_counter()
    if step.kind == "train":
        from megadistill.train import run

        resumed = (Path(cfg.output_dir) / "checkpoints").is_dir()
        result = run(cfg, progress=progress)
        rec.update(steps=result.steps, val_losses={str(k): v for k, v in sorted(result.val_losses.items())},
                   resumed=resumed, last_metrics=result.last_metrics)
    elif step.kind == "precompute":
        from megadistill.store.precompute import precompute

        precompute(cfg, progress=progress, **step.options)
    elif step.kind == "score":
        from megadistill.salt.score import score_data

        score_data(cfg, progress=progress)
    else:
        raise ValueError(f"unknown demo step kind {step.kind!r}")
    rec["seconds"] = time.perf_counter() - t0
    if step.kind == "precompute":
        rec.update(_store_size(cfg.teacher.store, cfg.data.seq_length))
    if step.kind == "train" and cfg.record_logits.store:
        rec.update(_store_size(cfg.record_logits.store, cfg.data.seq_length))
    return rec


def _child(step: Step, progress: bool, result: str) -> None:
    # One process of its own: rank 0 of a world of 1 (the launch picks a free port).
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    try:
        rec = _execute(step, progress)
        Path(result).write_text(json.dumps({"ok": rec}))
    except BaseException as e:  # noqa: BLE001 — handed to the parent, which names the step
        Path(result).write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}))
        raise SystemExit(1)


def record_path(out: Path, name: str) -> Path:
    return out / "records" / f"{name}.json"


def load_record(out: Path, step: Step, upstream: tuple = ()):
    """The step's finished record, or None (absent, or made for another config or from other
    upstream results, ``config_sha256``)."""
    p = record_path(out, step.name)
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    return rec if rec.get("config_sha256") == config_sha256(step, upstream) else None


def outputs(step: Step) -> list[Path]:
    """The directories ``step`` writes."""
    cfg = step.cfg
    paths = [Path(cfg.output_dir)]
    if step.kind == "precompute":
        paths.append(Path(cfg.teacher.store))
    if step.kind == "score":
        paths.append(Path(cfg.data_selection.scores))
    if cfg.record_logits.store:
        paths.append(Path(cfg.record_logits.store))
    return paths


def _claim_outputs(out: Path, step: Step, upstream: tuple = ()) -> None:
    """Make ``step``'s outputs this config's: outputs begun for the same config (and upstream
    results) stay (to resume); any others (another config's, an earlier demo version's) are
    renamed aside."""
    marker = out / "records" / f"{step.name}.started"
    sha = config_sha256(step, upstream)
    if marker.is_file() and marker.read_text().strip() == sha:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for p in outputs(step):
        if p.exists():
            aside, n = p.with_name(f"{p.name}.superseded-{stamp}"), 1
            while aside.exists():  # never onto another name in use
                aside, n = p.with_name(f"{p.name}.superseded-{stamp}-{n}"), n + 1
            print(f"[demo] {p} was made for another config: moved to {aside}", flush=True)
            os.replace(p, aside)
    _write_text(marker, sha)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_step(out: Path, step: Step, progress: bool = True, upstream: tuple = ()) -> dict:
    """Run ``step`` in a forked process (or reuse its record); returns the record. ``upstream``:
    the ``config_sha256`` of the steps it reads (``step.uses``), part of its identity."""
    found = load_record(out, step, upstream)
    if found is not None:
        return found
    _claim_outputs(out, step, upstream)
    result = out / "records" / f".{step.name}.result.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    proc = mp.get_context("fork").Process(target=_child, args=(step, progress, str(result)))
    proc.start()
    proc.join()
    got = json.loads(result.read_text()) if result.is_file() else {}
    result.unlink(missing_ok=True)
    if proc.exitcode != 0 or "ok" not in got:
        why = got.get("error", f"the process exited with status {proc.exitcode}")
        raise DemoError(f"demo step {step.name} ({step.label}) failed: {why}; its output is in {step.cfg.output_dir}"
                        + (f"\n{got['trace']}" if "trace" in got else ""))
    rec = {**got["ok"], "name": step.name, "label": step.label, "kind": step.kind, "role": step.role,
           "group": step.group, "seed": step.seed, "uses": list(step.uses), "config_sha256": config_sha256(step, upstream),
           "train_steps": step.cfg.training.train_steps}
    _write_json(record_path(out, step.name), rec)
    return rec
