"""Shared pieces of the logits-store tests (test_store.py, test_store_pp.py, test_store_encoding.py):
the KD settings a store is made with, an offline-KD run reading a store, a store's files, and
shards and stores rewritten as older format versions wrote them.

(The teacher checkpoint these runs read is the ``teacher_ckpt`` fixture in this directory's
conftest.py.)
"""

from __future__ import annotations

from pathlib import Path

from tiny_runs import TEACHER, tiny_run

from megadistill.config import KDConfig, RunConfig, TeacherConfig
from megadistill.schedules import AlphaSchedule


def kd_config(**kw) -> KDConfig:
    """The stores' truncation: top-p 0.3, top-k 24, ghost bucket; constant α 0.5 (``kw`` replace any)."""
    return KDConfig(**{"top_p": 0.3, "top_k": 24, "truncation": "ghost", "alpha": AlphaSchedule("constant", alpha_max=0.5),
                       **kw})


def offline_run(out, corpus, ckpt, store, **kw) -> RunConfig:
    """``tiny_run`` distilling offline from ``store`` (made by ``TEACHER`` from ``ckpt``), with
    :func:`kd_config` unless ``kd=`` says otherwise."""
    kw.setdefault("kd", kd_config())
    return tiny_run(out, corpus, teacher=TeacherConfig(mode="offline", model=TEACHER, checkpoint=ckpt, store=str(store)),
                    **kw)


def store_files(store) -> dict[str, bytes]:
    """Every file of the store directory: name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(store).iterdir())}


def older_shard(buf: bytes, version: int) -> bytes:
    """The bytes a megadistill writing format ``version`` (2 or 3) wrote for shard ``buf``: its
    header without the version-4 keys (the temperatures; a shard with tails or draws at τ ≠ 1 has
    no older form) and, for version 2, without the sealed sha256. Section offsets are unchanged: the
    header keeps its room, space-padded."""
    import json

    from megadistill.store import format as fmt

    start = len(fmt.MAGIC) + 4
    room = int.from_bytes(buf[len(fmt.MAGIC) : start], "little")
    header = json.loads(buf[start : start + room])
    if header.pop("tail_temperatures", []) or header.pop("draw_temperature", 1.0) != 1.0:
        raise ValueError("a shard with tempered tails or draws at τ ≠ 1 has no older form")
    text = json.dumps({**header, "format_version": version}, sort_keys=True).encode()
    body = buf[:start] + text + b" " * (room - len(text)) + buf[start + room : len(buf) - fmt.SEAL_BYTES]
    return fmt.seal(body) if version >= fmt.SEALED_VERSION else body


def as_version(store, version: int) -> None:
    """Rewrite finished ``store`` as megadistill wrote it for format ``version`` (2 or 3): shards by
    :func:`older_shard`, a manifest without temperatures in ``truncation`` and, for version 2,
    without its checksum."""
    import hashlib
    import json

    from megadistill.store import format as fmt

    store = Path(store)
    m = json.loads((store / "manifest.json").read_text())
    for e in m["shards"]:
        path = store / e["file"]
        data = older_shard(path.read_bytes(), version)
        path.write_bytes(data)
        e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    m.get("truncation", {}).pop("temperatures", None)
    m.pop("manifest_sha256", None)
    m.update(format_version=version, total_bytes=sum(e["bytes"] for e in m["shards"]))
    if version >= fmt.SEALED_VERSION:
        m = fmt.sign_manifest(m)
    (store / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))
