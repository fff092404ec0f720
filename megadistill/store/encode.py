"""Encoding a shard: one sample's targets (:class:`SampleTargets`) -> chunks of the shard's
sections (:mod:`megadistill.store.codec`), zstd-compressed per sample if asked, laid out behind the
magic and a JSON header that records every section's offset, and sealed with the sha256 of all
of it (format version 3, ``FORMAT.md``). The bytes are a pure function of the inputs: a re-run
writes identical shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megadistill.store.codec import (
    LOGPROB_DTYPES, QLOG_STEP, RESIDUAL_DTYPES, count_dtype, encode_logprobs, encode_residual, entry_starts, id_bits,
    pack_ids, quantise_logprobs,
)
from megadistill.store.format import COMPRESSIONS, FORMAT_VERSION, KINDS, MAGIC, chunked_sections, seal

ZSTD_LEVEL = 3
_ALIGN = 8
# Bit-packed ids are close to uniformly random bytes: zstd would only spend time on them.
_NEVER_COMPRESSED = ("ids",)


@dataclass
class SampleTargets:
    """One sample's targets, flat over positions (position-major). Top-p-k: each position's ids by
    descending log-prob, ties by ascending id, with ``residual`` and ``logprobs``. RS-KD: each
    position's distinct sampled ids by descending draw count, ties by ascending id, with ``draws``
    (``residual``/``logprobs`` None)."""

    hash: bytes
    """``megadistill.store.format.sample_hash`` of the sample's tokens and labels."""
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

    # No zstd checksum and no dictionary: the shard's sealed sha256 covers the bytes, and each frame must
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
        per_pos = np.add.reduceat(draws, entry_starts(counts)) if e else np.zeros(0)
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
    """The bytes of one (version 3) shard holding ``samples`` (global indices ``first_sample`` on),
    ending with the sha256 of the bytes before it (``format.seal``: a resumed writer tells a
    finished shard by its content).
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
    return seal(_lay_out(header, ("sample_hash", "chunk_offsets") + names, parts))


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
