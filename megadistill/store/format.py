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
up to 2^32). Log-probs are τ = 1, in one of :data:`LOGPROB_DTYPES`: fp32, fp16, or ``qlog64`` /
``qlog16`` (a log-space grid of 1/64 or 1/16 nat, one byte per gap between a position's sorted
codes); the residual mass ``1 - Σp`` of the truncated ids is stored per position
(:data:`RESIDUAL_DTYPES`). Every section but the ids (incompressible) may be zstd-compressed per
sample, so a sample stays readable on its own.

Format version 2 stores each sample's part of a section as one *chunk* (located by
``chunk_offsets``); version 1 shards (no compression, fp16/fp32 only, shard-wide arrays) are still
read. All integers are little-endian. Every function here is pure (bytes/arrays in, arrays out).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAGIC = b"MDKDSHD1"  # unchanged across versions: the header's format_version tells them apart
MANIFEST = "manifest.json"
PLAN = "precompute.json"
KINDS = ("top_p_k", "rskd")
# The dtype of one entry of the ``logprobs`` section, per log-prob encoding.
LOGPROB_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4"), "qlog64": np.dtype("|u1"), "qlog16": np.dtype("|u1")}
# Grid step (nats) of the quantised encodings.
QLOG_STEP = {"qlog64": 1 / 64, "qlog16": 1 / 16}
# The residual's dtype per log-prob encoding. A quantised shard recovers its log-probs' level from
# 1 - residual, which fp16 cannot resolve near residual 1 (a flat position's top-k): fp32 there.
RESIDUAL_DTYPES = {"fp16": "fp16", "fp32": "fp32", "qlog64": "fp32", "qlog16": "fp32"}
_FLOAT = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
COMPRESSIONS = (None, "zstd")
ZSTD_LEVEL = 3
# A gap code of 255 means "the gap is the next value of logprob_overflow" (rare: a gap >= 255 steps).
_ESCAPE = 255
SAMPLE_HASH_BYTES = 16
DEFAULT_SAMPLES_PER_SHARD = 1024
_ALIGN = 8
# Per-sample (chunked) sections of a version-2 shard, in file order, per kind and log-prob encoding.
# An RS-KD shard stores per-id draw counts instead of log-probs, and no residual (its empirical
# distribution has none).
_CHUNKED = {
    "top_p_k": ("counts", "residual", "ids", "logprobs"),
    "rskd": ("counts", "ids", "draws"),
}
# Bit-packed ids are close to uniformly random bytes: zstd would only spend time on them.
_NEVER_COMPRESSED = ("ids",)
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
    """Inverse of :func:`pack_ids`: ``int64[n]``.

    Each id spans at most ``ceil((bits + 7) / 8)`` <= 5 bytes from the byte holding its first bit:
    those bytes are gathered into one uint64 per id and shifted, rather than expanding the stream
    into ``n·bits`` bit planes (the reader's hot loop)."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size * 8 < n * bits:
        raise ValueError(f"{raw.size} bytes cannot hold {n} ids of {bits} bits")
    span = (bits + 7 + 7) // 8
    raw = np.concatenate([raw, np.zeros(span, dtype=np.uint8)])  # the last id may read past the end
    first_bit = np.arange(n, dtype=np.int64) * bits
    byte = first_bit >> 3
    word = raw[byte].astype(np.uint64)
    for k in range(1, span):
        word |= raw[byte + k].astype(np.uint64) << np.uint64(8 * k)
    word >>= (first_bit & 7).astype(np.uint64)
    return (word & np.uint64((1 << bits) - 1)).astype(np.int64)


def encode_logprobs(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """τ = 1 log-probs in ``dtype`` (fp16|fp32). fp16 rounds *down* (towards -inf): the stored
    probabilities then never sum above the true kept mass, so ``1 - Σp`` stays a valid residual."""
    lp = np.asarray(logprobs, dtype=np.float64)
    out = lp.astype(_FLOAT[dtype])
    if dtype == "fp16":
        up = out.astype(np.float64) > lp
        out[up] = np.nextafter(out[up], np.float16(-np.inf))
    return out


def _starts(counts: np.ndarray) -> np.ndarray:
    """``[s]`` index of each position's first entry in the flat entry order."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.cumsum(counts) - counts


def quantise_logprobs(logprobs: np.ndarray, counts: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """One sample's log-probs ``[Σ counts]`` (each position's by descending value) on a log grid.

    Entry j of a position gets the code ``c_j = round((lp_first - lp_j) / step)`` (so ``c_first =
    0``, which is not stored) and the stored value is the gap ``c_j - c_{j-1} >= 0``: small numbers
    that a general-purpose compressor packs into a few bits. Returns ``(gaps[Σ counts - s] uint8,
    overflow[e] uint32)``: a gap of 255 or more is stored as 255 and its value in ``overflow``. The
    level of the grid is not stored: the decoder recovers it from the residual
    (:func:`dequantise_logprobs`)."""
    counts = np.asarray(counts, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    if (counts < 1).any():
        raise ValueError("a quantised log-prob encoding needs at least one id at every position")
    if not np.isfinite(lp).all():
        raise ValueError("log-probs to quantise must be finite")
    starts = _starts(counts)
    code = np.rint((np.repeat(lp[starts], counts) - lp) / step).astype(np.int64)
    gap = np.diff(code, prepend=0)
    first = np.zeros(len(lp), dtype=bool)
    first[starts] = True
    gap = gap[~first]
    if (gap < 0).any():
        raise ValueError("log-probs must be sorted by descending value within each position to be quantised")
    if gap.size and int(gap.max()) > np.iinfo(np.uint32).max:
        raise ValueError("a log-prob gap does not fit the quantised encoding")
    big = gap >= _ESCAPE
    return np.where(big, _ESCAPE, gap).astype(np.uint8), gap[big].astype("<u4")


def dequantise_logprobs(gaps: np.ndarray, overflow: np.ndarray, counts: np.ndarray, residual: np.ndarray,
                        step: float) -> np.ndarray:
    """Inverse of :func:`quantise_logprobs`: float64 log-probs ``[Σ counts]``.

    The grid gives each position's log-probs up to a constant; the constant makes them sum to the
    stored kept mass ``1 - residual[s]``, so the decoded target is a proper distribution with the
    stored residual. Error: rounding moves each log-prob by at most step/2 and the shared constant
    by at most step/2, so ``|decoded - exact| <= step`` (plus the residual's own rounding)."""
    counts = np.asarray(counts, dtype=np.int64)
    gap = gaps.astype(np.int64)
    esc = np.flatnonzero(gap == _ESCAPE)
    if len(esc) != len(overflow):
        raise ValueError(f"{len(esc)} escaped log-prob gaps but {len(overflow)} overflow values")
    gap[esc] = overflow
    starts = _starts(counts)
    full = np.zeros(int(counts.sum()), dtype=np.int64)
    first = np.zeros(len(full), dtype=bool)
    first[starts] = True
    if int((~first).sum()) != len(gap):
        raise ValueError(f"{len(gap)} log-prob gap codes for {int((~first).sum())} entries")
    full[~first] = gap
    code = np.cumsum(full)
    code -= np.repeat(code[starts], counts)
    rel = code * -step  # log p - log p_first, <= 0
    log_sum = np.log(np.add.reduceat(np.exp(rel), starts)) if len(starts) else np.zeros(0)
    level = np.log1p(-np.asarray(residual, dtype=np.float64)) - log_sum
    return rel + np.repeat(level, counts)


def encode_residual(residual: np.ndarray, dtype: str) -> np.ndarray:
    """Residual masses ``[...]`` in [0, 1] in ``dtype`` (fp16|fp32; round to nearest, clipped to [0, 1])."""
    return np.clip(np.asarray(residual, dtype=np.float64), 0.0, 1.0).astype(_FLOAT[dtype])


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


def _zstd_compressor():
    import zstandard

    # No zstd checksum and no dictionary: the shard's sha256 covers the bytes, and each frame must
    # decode alone. Same version and level give the same bytes (byte-identical resumes).
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=True)


def _sample_chunks(s: SampleTargets, kind: str, logprob_dtype: Optional[str], cdt: np.dtype, bits: int,
                   num_draws: Optional[int]) -> dict[str, bytes]:
    """The uncompressed chunks of one sample, by section name."""
    counts = np.asarray(s.counts)
    e = int(counts.sum())
    values = s.draws if kind == "rskd" else s.logprobs
    if len(s.ids) != e or values is None or len(values) != e:
        raise ValueError(f"sample holds {len(s.ids)} ids and {0 if values is None else len(values)} "
                         f"{'draw counts' if kind == 'rskd' else 'log-probs'} for {e} counted entries")
    out = {"counts": counts.astype(cdt).tobytes(), "ids": pack_ids(s.ids, bits)}
    if kind == "rskd":
        draws = np.asarray(s.draws, dtype=np.int64)
        per_pos = np.add.reduceat(draws, _starts(counts)) if e else np.zeros(0)
        if (draws < 1).any() or not (per_pos == num_draws).all():
            raise ValueError(f"RS-KD draw counts must be >= 1 and sum to {num_draws} at every position")
        out["draws"] = draws.astype(count_dtype(num_draws)).tobytes()
        return out
    out["residual"] = encode_residual(s.residual, RESIDUAL_DTYPES[logprob_dtype]).tobytes()
    if logprob_dtype in QLOG_STEP:
        gaps, overflow = quantise_logprobs(s.logprobs, counts, QLOG_STEP[logprob_dtype])
        out["logprobs"], out["logprob_overflow"] = gaps.tobytes(), overflow.tobytes()
    else:
        out["logprobs"] = encode_logprobs(s.logprobs, logprob_dtype).tobytes()
    return out


def encode_shard(first_sample: int, samples: list[SampleTargets], seq_length: int, vocab_size: int,
                 logprob_dtype: Optional[str], kind: str = "top_p_k", num_draws: Optional[int] = None,
                 compression: Optional[str] = None) -> bytes:
    """The bytes of one (version 2) shard holding ``samples`` (global indices ``first_sample`` on).
    The output is a pure function of the inputs (byte-identical on a re-run). ``kind="rskd"``
    stores each sample's ``draws`` (out of ``num_draws`` per position) instead of log-probs and
    residuals. ``compression="zstd"`` compresses every sample's chunk of every section but the ids."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (known: {KINDS})")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r} (known: {COMPRESSIONS})")
    rskd = kind == "rskd"
    if rskd and not (num_draws and num_draws >= 1):
        raise ValueError("an RS-KD shard needs num_draws >= 1")
    if not rskd and logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"unknown log-prob encoding {logprob_dtype!r} (known: {tuple(LOGPROB_DTYPES)})")
    bits = id_bits(vocab_size)
    n = len(samples)
    for s in samples:
        if np.asarray(s.counts).shape != (seq_length,):
            raise ValueError(f"per-position counts {np.asarray(s.counts).shape} are not [{seq_length}]")
    cdt = count_dtype(max((int(np.max(s.counts)) for s in samples), default=0))
    lpd = None if rskd else logprob_dtype
    names = chunked_sections(kind, lpd)
    compressed = [k for k in names if k not in _NEVER_COMPRESSED] if compression else []
    zc = _zstd_compressor() if compression else None
    chunks = {k: [] for k in names}
    for s in samples:
        for k, raw in _sample_chunks(s, kind, lpd, cdt, bits, num_draws).items():
            chunks[k].append(zc.compress(raw) if k in compressed else raw)
    offsets = np.stack([np.concatenate([[0], np.cumsum([len(c) for c in chunks[k]])]) for k in names])
    parts = {"sample_hash": b"".join(s.hash for s in samples), "chunk_offsets": offsets.astype("<u8").tobytes()}
    parts.update({k: b"".join(chunks[k]) for k in names})
    header = {
        "format_version": FORMAT_VERSION, "kind": kind, "first_sample": first_sample, "num_samples": n,
        "seq_length": seq_length, "vocab_size": vocab_size, "id_bits": bits, "logprob_dtype": lpd,
        "residual_dtype": None if rskd else RESIDUAL_DTYPES[lpd], "count_dtype": cdt.str,
        "compression": compression, "compressed": compressed, "chunked": list(names), "sections": {},
    }
    if rskd:
        header.update(num_draws=num_draws, draw_dtype=count_dtype(num_draws).str)
    return _lay_out(header, ("sample_hash", "chunk_offsets") + names, parts)


def _lay_out(header: dict, order: tuple[str, ...], parts: dict[str, bytes]) -> bytes:
    """Magic, length-prefixed JSON header recording each section's ``[offset, length]``, then the
    sections in ``order``, each 8-byte aligned."""
    # The header's length depends on the offsets it records: lay out with a fixed-width estimate.
    header_room = len(json.dumps({**header, "sections": {k: [10**15, 10**15] for k in order}}, sort_keys=True)) + 8
    offset = len(MAGIC) + 4 + header_room
    offset += _pad(offset)
    for k in order:
        header["sections"][k] = [offset, len(parts[k])]
        offset += len(parts[k]) + _pad(len(parts[k]))
    hbytes = json.dumps(header, sort_keys=True).encode()
    hbytes += b" " * (header_room - len(hbytes))
    out = bytearray(MAGIC + np.uint32(header_room).astype("<u4").tobytes() + hbytes)
    out += b"\0" * _pad(len(out))
    for k in order:
        out += parts[k] + b"\0" * _pad(len(parts[k]))
    return bytes(out)


class Shard:
    """A decoded view of one shard's bytes (a ``numpy.memmap`` or ``bytes``); nothing is copied
    until :meth:`sample` is called, and then only that sample's chunks (decompressed if need be).
    Reads format versions 1 and 2. ``name`` is used in error messages."""

    def __init__(self, buf, name: str) -> None:
        self.name = name
        mv = np.frombuffer(buf, dtype=np.uint8)
        self.nbytes = len(mv)
        if len(mv) < len(MAGIC) + 4 or bytes(mv[: len(MAGIC)]) != MAGIC:
            raise StoreError(f"shard {name} is not a megadistill logits shard (bad magic or truncated)")
        hlen = int(np.frombuffer(mv[len(MAGIC) : len(MAGIC) + 4], dtype="<u4")[0])
        try:
            self.header = json.loads(bytes(mv[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"shard {name} has an unreadable header ({e}); it is truncated or corrupt") from e
        h = self.header
        self.version = h.get("format_version")
        if self.version not in READABLE_VERSIONS:
            raise StoreError(f"shard {name} has format version {self.version!r}; this megadistill reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (a newer megadistill wrote it?)")
        end = max(o + n for o, n in h["sections"].values())
        if len(mv) < end:
            raise StoreError(f"shard {name} is truncated: {len(mv)} bytes, its header describes {end}")
        sec = {k: mv[o : o + n] for k, (o, n) in h["sections"].items()}
        self.first_sample, self.num_samples = h["first_sample"], h["num_samples"]
        self.seq_length, self.bits = h["seq_length"], h["id_bits"]
        self.kind = h.get("kind", "top_p_k")
        self.logprob_dtype = h.get("logprob_dtype")
        n = self.num_samples
        if self.kind not in KINDS or self.logprob_dtype not in ((None,) if self.kind == "rskd" else tuple(LOGPROB_DTYPES)):
            raise StoreError(f"shard {name} is of unknown kind {self.kind!r} or log-prob encoding {self.logprob_dtype!r}")
        expected = SECTIONS_V1[self.kind] if self.version == 1 else \
            ("sample_hash", "chunk_offsets") + chunked_sections(self.kind, self.logprob_dtype)
        if set(h["sections"]) != set(expected):
            raise StoreError(f"shard {name} lacks the sections of a version-{self.version} {self.kind} shard")
        self.hashes = sec["sample_hash"].reshape(n, SAMPLE_HASH_BYTES)
        self._cdt = np.dtype(h["count_dtype"])
        self._sec = sec
        self._local = threading.local()  # a zstd decompressor per thread (they are not thread-safe)
        if self.kind == "rskd":
            self.num_draws = int(h["num_draws"])
            self._ddt = np.dtype(h["draw_dtype"])
            # log(c / N) for every possible count c, computed once (float64, then rounded).
            with np.errstate(divide="ignore"):  # count 0 never occurs in a valid shard; -inf if it does
                self._log_frac = np.log(np.arange(self.num_draws + 1) / self.num_draws).astype(np.float32)
        if self.version == 1:
            self._v1_offsets()
            self.compressed = ()
            self.residual_dtype = self.logprob_dtype
        else:
            self.compressed = tuple(h["compressed"])
            self.residual_dtype = h["residual_dtype"]
            names = chunked_sections(self.kind, self.logprob_dtype)
            offsets = sec["chunk_offsets"]
            if len(offsets) != len(names) * (n + 1) * 8:
                raise StoreError(f"shard {name} has {len(offsets)} bytes of chunk offsets for {n} samples (corrupt)")
            self._offsets = dict(zip(names, offsets.view("<u8").reshape(len(names), n + 1)))

    def _v1_offsets(self) -> None:
        """Version 1 keeps shard-wide arrays: express each sample's slice of them as a chunk."""
        n, s = self.num_samples, self.seq_length
        entries = self._sec["entry_offsets"].view("<u8").astype(np.int64)
        per_pos = np.arange(n + 1, dtype=np.int64) * s
        value_dt = self._ddt if self.kind == "rskd" else LOGPROB_DTYPES[self.logprob_dtype]
        self._offsets = {"counts": per_pos * self._cdt.itemsize, "ids": self._sec["id_offsets"].view("<u8"),
                         "draws" if self.kind == "rskd" else "logprobs": entries * value_dt.itemsize}
        if self.kind == "top_p_k":
            self._offsets["residual"] = per_pos * LOGPROB_DTYPES[self.logprob_dtype].itemsize

    @property
    def counts(self) -> np.ndarray:
        """``[n, s]`` ids kept at each position of every sample (decoded once, on first use)."""
        if getattr(self, "_all_counts", None) is None:
            self._all_counts = np.stack([self._counts(i) for i in range(self.num_samples)]) if self.num_samples \
                else np.zeros((0, self.seq_length), dtype=self._cdt)
        return self._all_counts

    @property
    def entries(self) -> int:
        """Kept ids in the whole shard (Σ counts over its samples)."""
        return int(self.counts.sum(dtype=np.int64))

    def _chunk(self, name: str, i: int) -> np.ndarray:
        """Sample ``i``'s (local index) bytes of section ``name``, decompressed."""
        off = self._offsets[name]
        raw = self._sec[name][int(off[i]) : int(off[i + 1])]
        if name not in self.compressed:
            return raw
        dec = getattr(self._local, "zstd", None)
        if dec is None:
            import zstandard

            dec = self._local.zstd = zstandard.ZstdDecompressor()
        try:
            return np.frombuffer(dec.decompress(raw.tobytes()), dtype=np.uint8)
        except Exception as e:  # zstandard.ZstdError; a corrupt frame in an unverified shard
            raise StoreError(f"shard {self.name}, sample {self.first_sample + i}: section {name} does not "
                             f"decompress ({e}); the shard is corrupt") from e

    def _view(self, name: str, i: int, dtype) -> np.ndarray:
        """Sample ``i``'s chunk of section ``name`` as an array of ``dtype``."""
        raw, dtype = self._chunk(name, i), np.dtype(dtype)
        if len(raw) % dtype.itemsize:
            raise StoreError(f"shard {self.name}, sample {self.first_sample + i}: section {name} holds {len(raw)} "
                             f"bytes, not a whole number of {dtype} values (corrupt)")
        return raw.view(dtype)

    def _counts(self, i: int) -> np.ndarray:
        return self._view("counts", i, self._cdt)

    def _local_index(self, index: int) -> int:
        i = index - self.first_sample
        if not 0 <= i < self.num_samples:
            raise StoreError(f"sample {index} is not in shard {self.name} (samples {self.first_sample}.."
                             f"{self.first_sample + self.num_samples - 1})")
        return i

    def _ids(self, i: int, counts: np.ndarray) -> np.ndarray:
        e = int(counts.sum())
        if counts.shape != (self.seq_length,) or len(self._chunk("ids", i)) != (e * self.bits + 7) // 8:
            raise StoreError(f"shard {self.name}, sample {self.first_sample + i}: per-position counts disagree "
                             "with its id stream (corrupt)")
        return unpack_ids(self._chunk("ids", i), e, self.bits)

    def sample_flat(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Global sample ``index`` as stored, flat: ``(counts[s], ids[Σ counts], logprobs[Σ counts]
        float32, residual[s] float32 or None)``. RS-KD: the log-probs are those of the empirical
        distribution, ``log(draws / num_draws)``, and the residual is None (there is none)."""
        i = self._local_index(index)
        counts = self._counts(i).astype(np.int64)
        ids = self._ids(i, counts)
        e = len(ids)
        if self.kind == "rskd":
            draws = self._view("draws", i, self._ddt)
            if len(draws) != e:
                raise StoreError(f"shard {self.name}, sample {index}: {len(draws)} draw counts for {e} ids (corrupt)")
            return counts, ids, self._log_frac[np.minimum(draws, self.num_draws)], None
        residual = self._view("residual", i, _FLOAT[self.residual_dtype])
        if self.logprob_dtype in QLOG_STEP:
            try:
                lp = dequantise_logprobs(self._chunk("logprobs", i), self._view("logprob_overflow", i, "<u4"),
                                         counts, residual, QLOG_STEP[self.logprob_dtype]).astype(np.float32)
            except ValueError as err:
                raise StoreError(f"shard {self.name}, sample {index}: {err} (corrupt)") from err
        else:
            lp = self._view("logprobs", i, LOGPROB_DTYPES[self.logprob_dtype]).astype(np.float32)
        if len(lp) != e or len(residual) != self.seq_length:
            raise StoreError(f"shard {self.name}, sample {index}: per-position counts disagree with its "
                             "log-probs or residuals (corrupt)")
        return counts, ids, lp, residual.astype(np.float32)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global sample ``index`` as ``(ids[s, k] int64 with -1 pads, logprobs[s, k] float32 with
        -inf pads, residual[s] float32)``, k = its largest per-position count. RS-KD: the log-probs
        are those of the empirical distribution, ``log(draws / num_draws)``, and the residual is 0."""
        counts, ids, lp, residual = self.sample_flat(index)
        if residual is None:
            residual = np.zeros(self.seq_length, dtype=np.float32)
        k = int(counts.max()) if counts.size else 0
        # Entry j of position t goes to flat slot t·k + j: its index minus the position's start, plus t·k.
        flat = np.arange(len(ids)) + np.repeat(np.arange(self.seq_length) * k - _starts(counts), counts)
        out_ids = np.full(self.seq_length * k, -1, dtype=np.int64)
        out_lp = np.full(self.seq_length * k, -np.inf, dtype=np.float32)
        out_ids[flat] = ids
        out_lp[flat] = lp
        return out_ids.reshape(self.seq_length, k), out_lp.reshape(self.seq_length, k), residual

    def sample_draws(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RS-KD: global sample ``index``'s stored ``(ids[Σ counts], draws[Σ counts])``, flat."""
        i = self._local_index(index)
        ids = self._ids(i, self._counts(i).astype(np.int64))
        return ids, self._view("draws", i, self._ddt).astype(np.int64)


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
