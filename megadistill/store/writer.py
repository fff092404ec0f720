"""Writing a store: atomic files, the in-progress plan, finished-shard discovery, the manifest.

Every file is written to a temporary name in the same directory, fsynced and renamed over its
final name, so a killed writer leaves either the old file or the new one, never half of one.
``manifest.json`` is written last, so a store with a manifest is complete.

A shard found on disk is trusted by its content only: it must hash to the sha256 sealed into it
when it was written (``format.sealed_sha256``), so a shard damaged after its writer died is
recomputed by a resumed precompute (:func:`finished_shards`) and never described by a manifest
(:func:`finish` records the checksums it verified, not a fresh hash of whatever is on disk).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.store.decode import Shard, header_disagreements
from megadistill.store.format import (
    FORMAT_VERSION, MANIFEST, PLAN, TEMPERED_VERSION, StoreError, dump_json, load_json, load_manifest, sealed_sha256,
    shard_name, shard_ranges, sign_manifest,
)

logger = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename (and fsync both).

    The temporary name holds the process id and the host name: array tasks on several nodes of a
    shared file system may write the same file (the plan, the manifest) at once, and process ids
    repeat across nodes."""
    path = Path(path)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{host}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def begin(store: Path, plan: dict) -> None:
    """Prepare ``store`` for a precompute described by ``plan`` (identity, encoding, sample counts).

    A store begun or finished for the same plan is resumed (nothing is removed); one made for any
    other plan is refused rather than mixed into.
    """
    store.mkdir(parents=True, exist_ok=True)
    # A finished store of an older, still readable format version is complete as it is; a plan in
    # progress is continued only by the version that began it (its shards are that version's).
    for existing, ignored in ((_as_current(read_manifest(store)), {"format_version"}), (load_json(store / PLAN), set())):
        if existing is not None:
            diff = sorted(k for k in plan if k not in ignored and existing.get(k) != plan[k])
            if "format_version" in diff:  # its other keys are that version's: the version is what to say
                raise StoreError(
                    f"logits store {store} holds a store begun by a megadistill writing format version "
                    f"{existing.get('format_version')!r}, this one writes {plan['format_version']!r}: finish it with "
                    "that version, or remove that directory"
                )
            if diff:
                raise StoreError(
                    f"teacher.store {store} holds a store made for another run (differs in: {', '.join(diff)}); "
                    "give another teacher.store or remove that directory"
                )
    # A finished store needs no plan: a re-run (or a late array task) must not leave one behind.
    if load_json(store / PLAN) is None and load_json(store / MANIFEST) is None:
        write_atomic(store / PLAN, dump_json(plan))


def _as_current(manifest: Optional[dict]) -> Optional[dict]:
    """A finished store's manifest with what its format version left implicit made explicit, so that
    a plan of this version compares with it: before version 4, a top-p-k store served τ = 1 alone
    (``truncation.temperatures`` [1.0])."""
    if manifest is None or manifest.get("format_version", FORMAT_VERSION) >= TEMPERED_VERSION:
        return manifest
    if manifest.get("kind", "top_p_k") == "top_p_k" and isinstance(manifest.get("truncation"), dict):
        return {**manifest, "truncation": {"temperatures": [1.0], **manifest["truncation"]}}
    return manifest


def verified_shards(store: Path, plan: dict) -> tuple[dict[int, dict], dict[int, str]]:
    """The shards of ``plan`` on disk, by content: ``(verified, damaged)``.

    ``verified`` maps a shard's index to its manifest entry (``file``, ``first_sample``,
    ``num_samples``, ``bytes``, ``sha256`` of the whole file) for every shard whose bytes hash to
    the sha256 sealed into it and whose header agrees with ``plan`` and its sample range.
    ``damaged`` maps the index of every other shard file present to why it is not trusted (one
    phrase). Missing shards are in neither. Reads every shard once."""
    verified, damaged = {}, {}
    for i, (first, count) in enumerate(shard_ranges(plan["num_samples"], plan["samples_per_shard"])):
        path = store / shard_name(i)
        if not path.is_file():
            continue
        size = path.stat().st_size
        buf = np.memmap(path, dtype=np.uint8, mode="r") if size else b""
        digest = sealed_sha256(buf)
        if digest is None:
            damaged[i] = "its bytes do not hash to the sha256 sealed into it (damaged or cut short after it was written)"
            continue
        try:
            problems = header_disagreements(Shard(buf, path.name), plan, first, count)
        except StoreError as e:  # sealed, but by a format this reader does not know
            problems = [str(e)]
        if problems:
            damaged[i] = "; ".join(problems)
            continue
        verified[i] = {"file": path.name, "first_sample": first, "num_samples": count, "bytes": size, "sha256": digest}
    return verified, damaged


def finished_shards(store: Path, plan: dict) -> set[int]:
    """Indices of the shards already written for ``plan``, trusted by their content
    (:func:`verified_shards`); any other shard file is left out, to be written again, with a
    warning naming it."""
    verified, damaged = verified_shards(store, plan)
    for i, why in sorted(damaged.items()):
        logger.warning("logits store %s: %s is not trusted and will be computed again: %s", store, shard_name(i), why)
    return set(verified)


def finish(store: Path, plan: dict, verified: Optional[dict[int, dict]] = None) -> dict:
    """Write ``manifest.json`` for a store whose shards are all written: the plan plus each shard's
    file name, sample range, size and the sha256 verified against the one sealed into it
    (``verified``, from :func:`verified_shards`, or found here), and the manifest's own checksum.
    A missing or damaged shard is a ``StoreError`` naming it. Returns the manifest."""
    ranges = shard_ranges(plan["num_samples"], plan["samples_per_shard"])
    damaged: dict[int, str] = {}
    if verified is None:
        verified, damaged = verified_shards(store, plan)
    for i in range(len(ranges)):
        if i in damaged:
            raise StoreError(f"logits store {store}: {shard_name(i)} cannot go into the manifest: {damaged[i]}")
        if i not in verified:
            raise StoreError(f"shard {store / shard_name(i)} is missing: the precompute did not finish")
    shards = [verified[i] for i in range(len(ranges))]
    manifest = {**plan, "format_version": FORMAT_VERSION, "shards": shards,
                "total_bytes": sum(e["bytes"] for e in shards)}
    manifest = sign_manifest(manifest)
    write_atomic(store / MANIFEST, dump_json(manifest))
    (store / PLAN).unlink(missing_ok=True)
    return manifest


def read_manifest(store: Path) -> Optional[dict]:
    """The manifest of a finished store, checked (its checksum and its shard list,
    ``format.check_manifest``), or None if there is none."""
    return load_manifest(store)
