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
``chunk_offsets``); version 1 shards (no compression, fp16/fp32 only, shard-wide arrays) are still
read. All integers are little-endian.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np

from megadistill.store.codec import QLOG_STEP

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAGIC = b"MDKDSHD1"  # unchanged across versions: the header's format_version tells them apart
MANIFEST = "manifest.json"
PLAN = "precompute.json"
KINDS = ("top_p_k", "rskd")
COMPRESSIONS = (None, "zstd")
SAMPLE_HASH_BYTES = 16
DEFAULT_SAMPLES_PER_SHARD = 1024
# Per-sample (chunked) sections of a version-2 shard, in file order, per kind and log-prob encoding.
# An RS-KD shard stores per-id draw counts instead of log-probs, and no residual (its empirical
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


def chunked_sections(kind: str, logprob_dtype: Optional[str]) -> tuple[str, ...]:
    """Names of a version-2 shard's per-sample sections, in file order."""
    extra = ("logprob_overflow",) if logprob_dtype in QLOG_STEP else ()
    return _CHUNKED[kind] + extra


def sample_hash(tokens, labels) -> bytes:
    """The identity of one training sample: sha256 of its ``tokens[s]`` then ``labels[s]`` as int32
    little-endian, first 16 bytes. Data, seed, sequence length or tokenizer changes alter it."""
    t = np.asarray(tokens).astype("<i4").tobytes()
    lab = np.asarray(labels).astype("<i4").tobytes()
    return hashlib.sha256(t + lab).digest()[:SAMPLE_HASH_BYTES]


def bytes_sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def check_manifest(manifest: dict, where: str) -> None:
    """Raise ``StoreError`` unless ``manifest`` has the keys and version this reader needs."""
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(f"{where}: format version {manifest.get('format_version')!r}; this megadistill reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    if manifest.get("kind") not in KINDS:
        raise StoreError(f"{where}: unknown store kind {manifest.get('kind')!r} (known: {KINDS})")
    for key in ("identity", "encoding", "num_samples", "samples_per_shard", "shards"):
        if key not in manifest:
            raise StoreError(f"{where}: manifest lacks {key!r}")


def shard_of(sample: int, samples_per_shard: int) -> int:
    return sample // samples_per_shard


def dump_json(obj) -> bytes:
    """Deterministic JSON (sorted keys, fixed indentation): re-runs write identical bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def load_json(path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path} is not readable JSON ({e})") from e
