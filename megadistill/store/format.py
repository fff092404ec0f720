"""The offline logits store's on-disk format: shard encoding/decoding and the manifest schema.

A store is a directory (see ``FORMAT.md`` beside this file for the full description):

* ``manifest.json`` — written last, atomically: format version, the identity of the teacher, the
  tokenizer and the dataset, the truncation settings, the encoding, and every shard's size and
  sha256. A store without it is incomplete (a precompute still running or killed).
* ``precompute.json`` — the identity a precompute in progress works for (resume checks it).
* ``shard-NNNNNN.bin`` — the targets of global samples ``[N·S, (N+1)·S)`` (S = ``samples_per_shard``;
  the last shard may hold fewer).

Top-p-k targets keep, per position, a *variable* number of ids (top-p makes the count vary): a
shard stores a per-position count rather than padding to a k_max, so a flat teacher position does
not inflate every other position. Ids are bit-packed to ``ceil(log2(vocab))`` bits (any vocabulary
up to 2^32); log-probs are τ = 1, fp16 (default) or fp32; the residual mass ``1 - Σp`` of the
truncated ids is stored per position in the same dtype.

All integers are little-endian. Every function here is pure (bytes/arrays in, arrays out).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

FORMAT_VERSION = 1
MAGIC = b"MDKDSHD1"
MANIFEST = "manifest.json"
PLAN = "precompute.json"
KINDS = ("top_p_k", "rskd")
LOGPROB_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
SAMPLE_HASH_BYTES = 16
DEFAULT_SAMPLES_PER_SHARD = 1024
_ALIGN = 8
# Section order inside a shard (each 8-byte aligned), per kind. An RS-KD shard stores per-id draw
# counts instead of log-probs, and no residual (its empirical distribution has none).
SECTIONS_OF = {
    "top_p_k": ("sample_hash", "counts", "residual", "id_offsets", "entry_offsets", "ids", "logprobs"),
    "rskd": ("sample_hash", "counts", "id_offsets", "entry_offsets", "ids", "draws"),
}
SECTIONS = SECTIONS_OF["top_p_k"]


class StoreError(ValueError):
    """A store that cannot be used: missing, incomplete, corrupt, or made for other data."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.bin"


def id_bits(vocab_size: int) -> int:
    """Bits per packed id for ids in ``[0, vocab_size)`` (1..32)."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocabulary size must be in [1, 2**32], got {vocab_size}")
    return max(1, (vocab_size - 1).bit_length())


def count_dtype(max_count: int) -> np.dtype:
    """The narrowest unsigned dtype holding per-position counts up to ``max_count``."""
    for dt in ("<u1", "<u2", "<u4"):
        if max_count <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{max_count} ids at one position do not fit a uint32 count")


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """``ids[n]`` (non-negative, < 2**bits) as a little-endian bitstream of ``ceil(n·bits/8)`` bytes:
    id j occupies bits ``[j·bits, (j+1)·bits)``, least significant bit first."""
    ids = np.asarray(ids, dtype=np.uint64)
    if ids.size and int(ids.max()) >> bits:
        raise ValueError(f"id {int(ids.max())} does not fit in {bits} bits")
    planes = ((ids[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_ids(buf, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``int64[n]``."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    planes = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits).astype(np.uint64)
    return (planes << np.arange(bits, dtype=np.uint64)).sum(-1, dtype=np.uint64).astype(np.int64)


def encode_logprobs(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """τ = 1 log-probs in ``dtype`` (fp16|fp32). fp16 rounds *down* (towards -inf): the stored
    probabilities then never sum above the true kept mass, so ``1 - Σp`` stays a valid residual."""
    lp = np.asarray(logprobs, dtype=np.float64)
    out = lp.astype(LOGPROB_DTYPES[dtype])
    if dtype == "fp16":
        up = out.astype(np.float64) > lp
        out[up] = np.nextafter(out[up], np.float16(-np.inf))
    return out


def encode_residual(residual: np.ndarray, dtype: str) -> np.ndarray:
    """Residual masses ``[...]`` in [0, 1] in ``dtype`` (round to nearest, clipped to [0, 1])."""
    return np.clip(np.asarray(residual, dtype=np.float64), 0.0, 1.0).astype(LOGPROB_DTYPES[dtype])


def sample_hash(tokens, labels) -> bytes:
    """The identity of one training sample: sha256 of its ``tokens[s]`` then ``labels[s]`` as int32
    little-endian, first 16 bytes. Data, seed, sequence length or tokenizer changes alter it."""
    t = np.asarray(tokens).astype("<i4").tobytes()
    lab = np.asarray(labels).astype("<i4").tobytes()
    return hashlib.sha256(t + lab).digest()[:SAMPLE_HASH_BYTES]


@dataclass
class SampleTargets:
    """One sample's targets, flat over positions (position-major). Top-p-k: each position's ids by
    descending log-prob, ties by ascending id, with ``residual`` and ``logprobs``. RS-KD: each
    position's distinct sampled ids by descending draw count, ties by ascending id, with ``draws``
    (``residual``/``logprobs`` None)."""

    hash: bytes
    """:func:`sample_hash` of the sample's tokens and labels."""
    counts: np.ndarray
    """``[s]`` ids kept at each position (>= 1)."""
    residual: Optional[np.ndarray]
    """``[s]`` mass of the truncated ids, 1 - Σp (float64); None for RS-KD."""
    ids: np.ndarray
    """``[Σ counts]`` global vocab ids."""
    logprobs: Optional[np.ndarray]
    """``[Σ counts]`` τ = 1 log-probs (float64 or float32); None for RS-KD."""
    draws: Optional[np.ndarray] = None
    """RS-KD: ``[Σ counts]`` how many of the position's ``num_draws`` samples drew each id (>= 1)."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode_shard(first_sample: int, samples: list[SampleTargets], seq_length: int, vocab_size: int,
                 logprob_dtype: Optional[str], kind: str = "top_p_k", num_draws: Optional[int] = None) -> bytes:
    """The bytes of one shard holding ``samples`` (global indices ``first_sample`` on). The output
    is a pure function of the inputs (byte-identical on a re-run). ``kind="rskd"`` stores each
    sample's ``draws`` (out of ``num_draws`` per position) instead of log-probs and residuals."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (known: {KINDS})")
    rskd = kind == "rskd"
    if rskd and not (num_draws and num_draws >= 1):
        raise ValueError("an RS-KD shard needs num_draws >= 1")
    bits = id_bits(vocab_size)
    n = len(samples)
    counts = np.stack([np.asarray(s.counts) for s in samples]) if n else np.zeros((0, seq_length))
    if counts.shape != (n, seq_length):
        raise ValueError(f"per-position counts {counts.shape} are not [{n}, {seq_length}]")
    cdt = count_dtype(int(counts.max()) if n else 0)
    parts = {"sample_hash": b"".join(s.hash for s in samples), "counts": counts.astype(cdt).tobytes()}
    if not rskd:
        parts["residual"] = encode_residual(np.stack([s.residual for s in samples]), logprob_dtype).tobytes()
    id_chunks = [pack_ids(s.ids, bits) for s in samples]
    parts["id_offsets"] = np.concatenate([[0], np.cumsum([len(c) for c in id_chunks])]).astype("<u8").tobytes()
    entries = [int(np.asarray(s.counts).sum()) for s in samples]
    for s, e in zip(samples, entries):
        values = s.draws if rskd else s.logprobs
        if len(s.ids) != e or values is None or len(values) != e:
            raise ValueError(f"sample holds {len(s.ids)} ids and {0 if values is None else len(values)} "
                             f"{'draw counts' if rskd else 'log-probs'} for {e} counted entries")
    parts["entry_offsets"] = np.concatenate([[0], np.cumsum(entries)]).astype("<u8").tobytes()
    parts["ids"] = b"".join(id_chunks)
    header = {
        "format_version": FORMAT_VERSION, "kind": kind, "first_sample": first_sample, "num_samples": n,
        "seq_length": seq_length, "vocab_size": vocab_size, "id_bits": bits,
        "logprob_dtype": None if rskd else logprob_dtype, "count_dtype": cdt.str, "sections": {},
    }
    if rskd:
        ddt = count_dtype(num_draws)
        for s in samples:
            per_pos = np.add.reduceat(np.asarray(s.draws, dtype=np.int64), np.cumsum(s.counts) - s.counts) \
                if len(s.draws) else np.zeros(0)
            if (np.asarray(s.draws) < 1).any() or not (per_pos == num_draws).all():
                raise ValueError(f"RS-KD draw counts must be >= 1 and sum to {num_draws} at every position")
        parts["draws"] = b"".join(np.asarray(s.draws).astype(ddt).tobytes() for s in samples)
        header.update(num_draws=num_draws, draw_dtype=ddt.str)
    else:
        parts["logprobs"] = b"".join(encode_logprobs(s.logprobs, logprob_dtype).tobytes() for s in samples)
    sections = SECTIONS_OF[kind]

    # The header's length depends on the offsets it records: lay out with a fixed-width estimate.
    header_room = len(json.dumps({**header, "sections": {k: [10**15, 10**15] for k in sections}}, sort_keys=True)) + 8
    offset = len(MAGIC) + 4 + header_room
    offset += _pad(offset)
    for k in sections:
        header["sections"][k] = [offset, len(parts[k])]
        offset += len(parts[k]) + _pad(len(parts[k]))
    hbytes = json.dumps(header, sort_keys=True).encode()
    hbytes += b" " * (header_room - len(hbytes))
    out = bytearray(MAGIC + np.uint32(header_room).astype("<u4").tobytes() + hbytes)
    out += b"\0" * _pad(len(out))
    for k in sections:
        out += parts[k] + b"\0" * _pad(len(parts[k]))
    return bytes(out)


class Shard:
    """A decoded view of one shard's bytes (a ``numpy.memmap`` or ``bytes``); nothing is copied
    until :meth:`sample` is called. ``name`` is used in error messages."""

    def __init__(self, buf, name: str) -> None:
        self.name = name
        mv = np.frombuffer(buf, dtype=np.uint8)
        if len(mv) < len(MAGIC) + 4 or bytes(mv[: len(MAGIC)]) != MAGIC:
            raise StoreError(f"shard {name} is not a megadistill logits shard (bad magic or truncated)")
        hlen = int(np.frombuffer(mv[len(MAGIC) : len(MAGIC) + 4], dtype="<u4")[0])
        try:
            self.header = json.loads(bytes(mv[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"shard {name} has an unreadable header ({e}); it is truncated or corrupt") from e
        h = self.header
        if h.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"shard {name} has format version {h.get('format_version')}, this reader reads {FORMAT_VERSION}")
        end = max(o + n for o, n in h["sections"].values())
        if len(mv) < end:
            raise StoreError(f"shard {name} is truncated: {len(mv)} bytes, its header describes {end}")
        sec = {k: mv[o : o + n] for k, (o, n) in h["sections"].items()}
        self.first_sample, self.num_samples = h["first_sample"], h["num_samples"]
        self.seq_length, self.bits = h["seq_length"], h["id_bits"]
        self.kind = h.get("kind", "top_p_k")
        if self.kind not in KINDS or set(h["sections"]) != set(SECTIONS_OF[self.kind]):
            raise StoreError(f"shard {name} is of unknown kind {self.kind!r} or lacks its sections")
        n, s = self.num_samples, self.seq_length
        self.hashes = sec["sample_hash"].reshape(n, SAMPLE_HASH_BYTES)
        self.counts = sec["counts"].view(np.dtype(h["count_dtype"])).reshape(n, s)
        self.id_offsets = sec["id_offsets"].view("<u8")
        self.entry_offsets = sec["entry_offsets"].view("<u8")
        self.ids = sec["ids"]
        if self.kind == "rskd":
            self.num_draws = int(h["num_draws"])
            self.draws = sec["draws"].view(np.dtype(h["draw_dtype"]))
            # log(c / N) for every possible count c, computed once (float64, then rounded).
            with np.errstate(divide="ignore"):  # count 0 never occurs in a valid shard; -inf if it does
                self._log_frac = np.log(np.arange(self.num_draws + 1) / self.num_draws).astype(np.float32)
        else:
            lpdt = LOGPROB_DTYPES[h["logprob_dtype"]]
            self.residual = sec["residual"].view(lpdt).reshape(n, s)
            self.logprobs = sec["logprobs"].view(lpdt)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample ``index`` as ``(ids[s, k] int64 with -1 pads, logprobs[s, k] float32 with
        -inf pads, residual[s] float32)``, k = its largest per-position count. RS-KD: the log-probs
        are those of the empirical distribution, ``log(draws / num_draws)``, and the residual is 0."""
        i = index - self.first_sample
        if not 0 <= i < self.num_samples:
            raise StoreError(f"sample {index} is not in shard {self.name} (samples {self.first_sample}.."
                             f"{self.first_sample + self.num_samples - 1})")
        counts = self.counts[i].astype(np.int64)
        e0, e1 = int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])
        if int(counts.sum()) != e1 - e0:
            raise StoreError(f"shard {self.name}, sample {index}: per-position counts disagree with its entry offsets (corrupt)")
        ids = unpack_ids(self.ids[int(self.id_offsets[i]) : int(self.id_offsets[i + 1])], e1 - e0, self.bits)
        if self.kind == "rskd":
            lp = self._log_frac[np.minimum(self.draws[e0:e1], self.num_draws)]
            residual = np.zeros(self.seq_length, dtype=np.float32)
        else:
            lp = self.logprobs[e0:e1].astype(np.float32)
            residual = self.residual[i].astype(np.float32)
        k = int(counts.max()) if counts.size else 0
        starts = np.cumsum(counts) - counts
        pos = np.repeat(np.arange(self.seq_length), counts)
        slot = np.arange(e1 - e0) - np.repeat(starts, counts)
        out_ids = np.full((self.seq_length, k), -1, dtype=np.int64)
        out_lp = np.full((self.seq_length, k), -np.inf, dtype=np.float32)
        out_ids[pos, slot] = ids
        out_lp[pos, slot] = lp
        return out_ids, out_lp, residual

    def sample_draws(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RS-KD: global sample ``index``'s stored ``(ids[Σ counts], draws[Σ counts])``, flat."""
        i = index - self.first_sample
        e0, e1 = int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])
        ids = unpack_ids(self.ids[int(self.id_offsets[i]) : int(self.id_offsets[i + 1])], e1 - e0, self.bits)
        return ids, self.draws[e0:e1].astype(np.int64)


def bytes_sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def check_manifest(manifest: dict, where: str) -> None:
    """Raise ``StoreError`` unless ``manifest`` has the keys and version this reader needs."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{where}: format version {manifest.get('format_version')!r}, this reader reads {FORMAT_VERSION}")
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
