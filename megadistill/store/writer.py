"""Writing a store: atomic files, the in-progress plan, finished-shard discovery, the manifest.

Every file is written to a temporary name in the same directory, fsynced and renamed over its
final name, so a killed writer leaves either the old file or the new one, never half of one. A
shard file that exists is therefore complete; ``manifest.json`` is written last, so a store with a
manifest is complete.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional

import numpy as np

from megadistill.store.decode import Shard
from megadistill.store.format import (
    FORMAT_VERSION, MANIFEST, PLAN, StoreError, bytes_sha256, dump_json, load_json, shard_name,
)


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


def shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    """``[(first_sample, count)]`` of every shard of a store of ``num_samples`` samples."""
    return [(a, min(samples_per_shard, num_samples - a)) for a in range(0, num_samples, samples_per_shard)]


def begin(store: Path, plan: dict) -> None:
    """Prepare ``store`` for a precompute described by ``plan`` (identity, encoding, sample counts).

    A store begun or finished for the same plan is resumed (nothing is removed); one made for any
    other plan is refused rather than mixed into.
    """
    store.mkdir(parents=True, exist_ok=True)
    for existing in (load_json(store / MANIFEST), load_json(store / PLAN)):
        if existing is not None:
            mine = {k: existing.get(k) for k in plan}
            if mine != plan:
                diff = sorted(k for k in plan if existing.get(k) != plan[k])
                raise StoreError(
                    f"teacher.store {store} holds a store made for another run (differs in: {', '.join(diff)}); "
                    "give another teacher.store or remove that directory"
                )
    # A finished store needs no plan: a re-run (or a late array task) must not leave one behind.
    if load_json(store / PLAN) is None and load_json(store / MANIFEST) is None:
        write_atomic(store / PLAN, dump_json(plan))


def finished_shards(store: Path, plan: dict) -> set[int]:
    """Indices of the shards already written for ``plan`` (files that decode with the right sample
    range); a damaged one is left out, to be written again."""
    done = set()
    for i, (first, count) in enumerate(shard_ranges(plan["num_samples"], plan["samples_per_shard"])):
        path = store / shard_name(i)
        if not path.is_file():
            continue
        try:
            shard = Shard(np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b"", path.name)
        except StoreError:
            continue
        if (shard.first_sample, shard.num_samples) == (first, count):
            done.add(i)
    return done


def finish(store: Path, plan: dict) -> dict:
    """Write ``manifest.json`` for a store whose shards are all written: the plan plus each shard's
    file name, sample range, size and sha256. Returns the manifest."""
    shards = []
    total_bytes = 0
    for i, (first, count) in enumerate(shard_ranges(plan["num_samples"], plan["samples_per_shard"])):
        path = store / shard_name(i)
        if not path.is_file():
            raise StoreError(f"shard {path} is missing: the precompute did not finish")
        data = path.read_bytes()
        shards.append({"file": path.name, "first_sample": first, "num_samples": count, "bytes": len(data),
                       "sha256": bytes_sha256(data)})
        total_bytes += len(data)
    manifest = {**plan, "format_version": FORMAT_VERSION, "shards": shards, "total_bytes": total_bytes}
    write_atomic(store / MANIFEST, dump_json(manifest))
    (store / PLAN).unlink(missing_ok=True)
    return manifest


def read_manifest(store: Path) -> Optional[dict]:
    """The manifest of a finished store, or None if there is none."""
    return load_json(Path(store) / MANIFEST)
