"""The offline logits store's on-disk format: its constants, the sections of a shard, the
identity of a sample, and the manifest schema. The pieces that turn targets into bytes live beside
it: :mod:`megadistill.store.codec` (ids, counts, log-probs, residuals), :mod:`megadistill.store.encode`
(a shard's bytes) and :mod:`megadistill.store.decode` (:class:`~megadistill.store.decode.Shard`).

A store is a directory (see ``FORMAT.md`` beside this file for the full description):

* ``manifest.json`` — written last, atomically: format version, the identity of the teacher, the
  tokenizer and the dataset, the truncation settings, the encoding, and every shard's size and
  sha256. A store without it is incomplete (a precompute still running or killed).
* ``precompute.json`` — the identity a precompute in progress works for (resume checks it).
* ``shard-NNNNNN.bin`` — the targets of global samples ``[N·S, (N+1)·S)`` (S = ``samples_per_shard``;
  the last shard may hold fewer).

Top-p-k targets keep, per position, a *variable* number of ids (top-p makes the count vary): a
shard stores a per-position count rather than padding to a k_max, so a flat teacher position does
not inflate every other position. Every section but the ids (incompressible) may be
zstd-compressed per sample, so a sample stays readable on its own.

Format version 2 stores each sample's part of a section as one *chunk* (located by
``chunk_offsets``); version 3 adds integrity that does not depend on the manifest: every shard ends
with the sha256 of its other bytes (:func:`seal`, :func:`sealed_sha256`), written in the same atomic
rename as the shard, so a resumed writer trusts a shard it finds only if its bytes still hash to
it; and the manifest carries ``manifest_sha256``, the sha256 of the canonical JSON of its other
keys (:func:`manifest_sha256`), so a hand edit or damage is refused wherever it is read
(:func:`check_manifest`). Version 4 adds what a loss at a temperature τ ≠ 1 needs: a top-p-k
shard may hold a ``tails`` section (per position and per τ of the manifest's
``truncation.temperatures`` but 1, the truncated ids' tempered mass ``log Σ p_i^(1/τ)``), and an
RS-KD store records the temperature its draws were made at (:func:`served_temperatures`). Versions
1 and 2 (no shard trailer, no manifest checksum) and 3 (no tails: τ = 1 only) are still read. All
integers are little-endian.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Optional

import numpy as np

from megadistill.store.codec import QLOG_STEP

FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# From this version on a shard ends with the sha256 of its other bytes and the manifest carries
# manifest_sha256: content, not structure, tells a finished shard or an unedited manifest.
SEALED_VERSION = 3
SEAL_BYTES = 32
# From this version on a top-p-k shard may hold tempered tails and an RS-KD shard its draw temperature;
# the manifest lists the temperatures the store serves.
TEMPERED_VERSION = 4
MAGIC = b"MDKDSHD1"  # unchanged across versions: the header's format_version tells them apart
MANIFEST = "manifest.json"
PLAN = "precompute.json"
KINDS = ("top_p_k", "rskd")
COMPRESSIONS = (None, "zstd")
SAMPLE_HASH_BYTES = 16
DEFAULT_SAMPLES_PER_SHARD = 1024
# Per-sample (chunked) sections of a version-2+ shard, in file order, per kind and log-prob encoding
# (and, version 4, whether it holds tempered tails: ``tails`` right after ``residual``). An RS-KD
# shard stores per-id draw counts instead of log-probs, and no residual (its empirical
# distribution has none).
_CHUNKED = {
    "top_p_k": ("counts", "residual", "ids", "logprobs"),
    "rskd": ("counts", "ids", "draws"),
}
# Version-1 layout (read only): shard-wide arrays plus per-sample offsets.
SECTIONS_V1 = {
    "top_p_k": ("sample_hash", "counts", "residual", "id_offsets", "entry_offsets", "ids", "logprobs"),
    "rskd": ("sample_hash", "counts", "id_offsets", "entry_offsets", "ids", "draws"),
}


class StoreError(ValueError):
    """A store that cannot be used: missing, incomplete, corrupt, or made for other data."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.bin"


def chunked_sections(kind: str, logprob_dtype: Optional[str], tails: bool = False) -> tuple[str, ...]:
    """Names of a version-2+ shard's per-sample sections, in file order; ``tails``: a version-4
    top-p-k shard with tail temperatures (its ``tails`` section follows ``residual``)."""
    names = _CHUNKED[kind]
    if tails:
        if kind != "top_p_k":
            raise ValueError(f"a {kind} shard has no tails section")
        names = names[:2] + ("tails",) + names[2:]
    extra = ("logprob_overflow",) if logprob_dtype in QLOG_STEP else ()
    return names + extra


def sample_hash(tokens, labels) -> bytes:
    """The identity of one training sample: sha256 of its ``tokens[s]`` then ``labels[s]`` as int32
    little-endian, first 16 bytes. Data, seed, sequence length or tokenizer changes alter it."""
    t = np.asarray(tokens).astype("<i4").tobytes()
    lab = np.asarray(labels).astype("<i4").tobytes()
    return hashlib.sha256(t + lab).digest()[:SAMPLE_HASH_BYTES]


def bytes_sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def seal(body: bytes) -> bytes:
    """A sealed (version 3 on) shard's bytes: ``body`` followed by its sha256 (:data:`SEAL_BYTES` bytes)."""
    return body + hashlib.sha256(body).digest()


def sealed_sha256(buf) -> Optional[str]:
    """The sha256 (hex) of a whole sealed shard ``buf`` (bytes or a uint8 memmap) if its trailer
    is the sha256 of the bytes before it, else None (damaged, truncated, or written before format
    version 3). One pass over the bytes gives both digests."""
    if len(buf) < len(MAGIC) + SEAL_BYTES:
        return None
    h = hashlib.sha256(buf[: len(buf) - SEAL_BYTES])
    trailer = bytes(buf[len(buf) - SEAL_BYTES :])
    if h.digest() != trailer:
        return None
    h.update(trailer)
    return h.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, ASCII) of every key of
    ``manifest`` but ``manifest_sha256`` itself: independent of how the file is indented."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def sign_manifest(manifest: dict) -> dict:
    """``manifest`` with its ``manifest_sha256``."""
    return {**manifest, "manifest_sha256": manifest_sha256(manifest)}


def is_protected(manifest: dict) -> bool:
    """Whether ``manifest`` carries a checksum (format version 3 on); older stores' do not."""
    return "manifest_sha256" in manifest


def served_temperatures(manifest: dict) -> tuple[float, ...]:
    """The loss temperatures at which store ``manifest``'s targets are exact, sorted.

    Top-p-k: those a ghost-bucket loss can use it at, ``truncation.temperatures`` (version 4; it
    holds 1.0, served by the residual, and the τ of the shards' tails); ``(1.0,)`` for older
    stores. A renormalising loss uses a top-p-k store at any τ (the kept ids' τ = 1 log-probs
    determine their tempered, renormalised distribution): that is not this list's business.
    RS-KD: ``(τ_s,)``, the temperature the draws were made at (``sampling.temperature``, 1.0 in
    older stores), the only τ their empirical distribution is unbiased for."""
    if manifest.get("kind", "top_p_k") == "rskd":
        return (float(manifest.get("sampling", {}).get("temperature", 1.0)),)
    return tuple(float(t) for t in manifest.get("truncation", {}).get("temperatures", (1.0,)))


def tail_temperatures(manifest: dict) -> tuple[float, ...]:
    """The τ of a top-p-k store's ``tails`` columns, in order: :func:`served_temperatures` but 1.0
    (empty for RS-KD and older stores)."""
    if manifest.get("kind", "top_p_k") == "rskd":
        return ()
    return tuple(t for t in served_temperatures(manifest) if t != 1.0)


def _is_temperature(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0


def _check_temperatures(manifest: dict, where: str) -> None:
    """Version 4: the temperatures the store declares (a key another version lacks is not asked for)."""
    bad = f"{where}: {MANIFEST}"
    if manifest["kind"] == "rskd":
        t = manifest.get("sampling", {}).get("temperature") if isinstance(manifest.get("sampling"), dict) else None
        if not _is_temperature(t):
            raise StoreError(f"{bad}: sampling.temperature {t!r} is not a temperature > 0 (the one the draws were made at)")
        return
    temps = manifest.get("truncation", {}).get("temperatures") if isinstance(manifest.get("truncation"), dict) else None
    if not isinstance(temps, list) or not all(_is_temperature(t) for t in temps):
        raise StoreError(f"{bad}: truncation.temperatures {temps!r} is not a list of temperatures > 0")
    if temps != sorted(set(temps)) or 1.0 not in temps:
        raise StoreError(f"{bad}: truncation.temperatures {temps!r} must be sorted, each once, and hold 1.0 "
                         "(served by the residual)")


def shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    """``[(first_sample, count)]`` of every shard of a store of ``num_samples`` samples."""
    return [(a, min(samples_per_shard, num_samples - a)) for a in range(0, num_samples, samples_per_shard)]


def check_manifest(manifest: dict, where: str) -> None:
    """Raise ``StoreError`` (one line, naming the manifest and the key) unless ``manifest`` has the
    keys and version this reader needs, its coverage agrees with its shard list (shard ``i`` is
    ``shard_name(i)`` holding ``shard_ranges(num_samples, samples_per_shard)[i]``, sizes summing
    to ``total_bytes``), from format version 4 on its temperatures are well formed
    (``truncation.temperatures``: sorted temperatures > 0 holding 1.0; ``sampling.temperature`` > 0)
    and, from format version 3 on, its content hashes to its
    ``manifest_sha256``. A manifest of an older version has no checksum and is read as it is."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{where}: {MANIFEST} is not a JSON object")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"{where}: format version {manifest.get('format_version')!r}; this megadistill reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if manifest.get("kind") not in KINDS:
        raise StoreError(f"{where}: unknown store kind {manifest.get('kind')!r} (known: {KINDS})")
    for key in ("identity", "encoding", "num_samples", "samples_per_shard", "shards"):
        if key not in manifest:
            raise StoreError(f"{where}: manifest lacks {key!r}")
    _check_coverage(manifest, where)
    if manifest["format_version"] >= TEMPERED_VERSION:
        _check_temperatures(manifest, where)
    if manifest["format_version"] >= SEALED_VERSION or is_protected(manifest):
        recorded, actual = manifest.get("manifest_sha256"), manifest_sha256(manifest)
        if recorded != actual:
            what = "has no manifest_sha256" if recorded is None else \
                f"fails its checksum (manifest_sha256 {str(recorded)[:12]}…, its content hashes to {actual[:12]}…)"
            raise StoreError(f"{where}: {MANIFEST} {what}: it was edited or damaged after the store was written; "
                             "restore it or write the store again")


def _check_coverage(manifest: dict, where: str) -> None:
    """The manifest's sample counts against its own shard list (cheap: no shard is read)."""
    n, per, shards = manifest["num_samples"], manifest["samples_per_shard"], manifest["shards"]
    bad = f"{where}: {MANIFEST}"
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise StoreError(f"{bad}: num_samples {n!r} is not a sample count")
    if not isinstance(per, int) or isinstance(per, bool) or per < 1:
        raise StoreError(f"{bad}: samples_per_shard {per!r} is not a positive sample count")
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise StoreError(f"{bad}: shards is not a list of shard entries")
    held = sum(e["num_samples"] for e in shards if isinstance(e.get("num_samples"), int))
    if held != n:
        raise StoreError(f"{bad}: num_samples {n} disagrees with its shards, which hold {held} samples "
                         "(edited or damaged)")
    want = shard_ranges(n, per)
    if len(shards) != len(want):
        raise StoreError(f"{bad}: samples_per_shard {per} makes {len(want)} shards of {n} samples, it lists "
                         f"{len(shards)} (edited or damaged)")
    for i, (e, (first, count)) in enumerate(zip(shards, want)):
        if (e.get("file"), e.get("first_sample"), e.get("num_samples")) != (shard_name(i), first, count):
            raise StoreError(
                f"{bad}: shard entry {i} is {e.get('file')!r} with samples {e.get('first_sample')!r}.. "
                f"({e.get('num_samples')!r}), but num_samples {n} and samples_per_shard {per} make it "
                f"{shard_name(i)} with samples {first}.. ({count}) (edited or damaged)")
    if "total_bytes" in manifest and manifest["total_bytes"] != sum(e.get("bytes") or 0 for e in shards
                                                                    if isinstance(e.get("bytes"), int)):
        raise StoreError(f"{bad}: total_bytes {manifest['total_bytes']!r} is not the sum of its shards' bytes "
                         "(edited or damaged)")


def shard_of(sample: int, samples_per_shard: int) -> int:
    return sample // samples_per_shard


def dump_json(obj) -> bytes:
    """Deterministic JSON (sorted keys, fixed indentation): re-runs write identical bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def load_manifest(store, where: Optional[str] = None) -> Optional[dict]:
    """The manifest of store directory ``store``, checked (:func:`check_manifest`; ``where`` names
    the store in errors), or None if it has none (an unfinished store)."""
    from pathlib import Path

    manifest = load_json(Path(store) / MANIFEST)
    if manifest is not None:
        check_manifest(manifest, where or f"logits store {store}")
    return manifest


def load_json(path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is not readable JSON ({e})") from e
