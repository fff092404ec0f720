"""Encoding a shard: one sample's targets (:class:`SampleTargets`) -> chunks of the shard's
sections (:mod:`megadistill.store.codec`), zstd-compressed per sample if asked, laid out behind the
magic and a JSON header that records every section's offset, and sealed with the sha256 of all
of it (format version 4, ``FORMAT.md``). The bytes are a pure function of the inputs: a re-run
writes identical shards.
"""

from __future__ import annotations

import json
import math
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
    descending log-prob, ties by ascending id, with ``residual``, ``logprobs`` and, for a store with
    tail temperatures, ``tails``. RS-KD: each position's distinct sampled ids by descending draw
    count, ties by ascending id, with ``draws`` (``residual``/``logprobs``/``tails`` None)."""

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
    tails: Optional[np.ndarray] = None
    """Top-p-k: ``[s, T]`` ``log Σ_truncated p_i^(1/τ_j)`` for the shard's ``tail_temperatures[j]``
    (float64; ``-inf`` where nothing is truncated); None when the shard has no tail temperatures."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _zstd_compressor():
    import zstandard

    # No zstd checksum and no dictionary: the shard's sealed sha256 covers the bytes, and each frame must
    # decode alone. Same version and level give the same bytes (byte-identical resumes).
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=True)


def _tails_chunk(tails, seq_length: int, temperatures: tuple) -> bytes:
    """A sample's ``tails[s, T]`` as little-endian float32, after checking its shape and values."""
    if tails is None:
        raise ValueError(f"the shard has tail temperatures {list(temperatures)} but a sample has no tails")
    t = np.asarray(tails, dtype=np.float64)
    if t.shape != (seq_length, len(temperatures)):
        raise ValueError(f"sample tails {t.shape} are not [{seq_length}, {len(temperatures)}] (positions x tail temperatures)")
    if np.isnan(t).any() or (t == np.inf).any():
        raise ValueError("sample tails must be finite or -inf (nothing truncated), got NaN or +inf")
    return t.astype("<f4").tobytes()


def _sample_chunks(s: SampleTargets, kind: str, logprob_dtype: Optional[str], cdt: np.dtype, bits: int,
                   num_draws: Optional[int], tail_temperatures: tuple = ()) -> dict[str, bytes]:
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
    if tail_temperatures:
        out["tails"] = _tails_chunk(s.tails, len(counts), tail_temperatures)
    elif s.tails is not None and np.asarray(s.tails).size:
        raise ValueError("a sample has tails but the shard has no tail temperatures")
    if logprob_dtype in QLOG_STEP:
        gaps, overflow = quantise_logprobs(s.logprobs, counts, QLOG_STEP[logprob_dtype])
        out["logprobs"], out["logprob_overflow"] = gaps.tobytes(), overflow.tobytes()
    else:
        out["logprobs"] = encode_logprobs(s.logprobs, logprob_dtype).tobytes()
    return out


def _check_temperatures(kind: str, tail_temperatures, draw_temperature) -> tuple[float, ...]:
    tails = tuple(float(t) if not isinstance(t, bool) else math.nan for t in tail_temperatures)
    if kind == "rskd" and tails:
        raise ValueError(f"an RS-KD shard has no tails, got tail temperatures {list(tails)}")
    if not all(math.isfinite(t) and t > 0 and t != 1.0 for t in tails) or list(tails) != sorted(set(tails)):
        raise ValueError(f"tail temperatures {list(tail_temperatures)} must be finite, > 0, not 1 (the residual "
                         "serves τ = 1), sorted and each once")
    if kind == "rskd" and not (isinstance(draw_temperature, (int, float)) and not isinstance(draw_temperature, bool)
                               and math.isfinite(draw_temperature) and draw_temperature > 0):
        raise ValueError(f"RS-KD draw temperature {draw_temperature!r} is not a finite number > 0")
    return tails


def encode_shard(first_sample: int, samples: list[SampleTargets], seq_length: int, vocab_size: int,
                 logprob_dtype: Optional[str], kind: str = "top_p_k", num_draws: Optional[int] = None,
                 compression: Optional[str] = None, tail_temperatures=(), draw_temperature: float = 1.0) -> bytes:
    """The bytes of one (version 4) shard holding ``samples`` (global indices ``first_sample`` on),
    ending with the sha256 of the bytes before it (``format.seal``: a resumed writer tells a
    finished shard by its content).
    The output is a pure function of the inputs (byte-identical on a re-run). ``kind="rskd"``
    stores each sample's ``draws`` (out of ``num_draws`` per position, drawn at
    ``draw_temperature``) instead of log-probs and residuals. A top-p-k shard with
    ``tail_temperatures`` (sorted τ ≠ 1) stores every sample's ``tails[s, T]`` as float32 (section
    ``tails``); ``draw_temperature`` is an RS-KD shard's only (a top-p-k shard ignores it).
    ``compression="zstd"`` compresses every sample's chunk of every section but the ids."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (known: {KINDS})")
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r} (known: {COMPRESSIONS})")
    rskd = kind == "rskd"
    if rskd and not (num_draws and num_draws >= 1):
        raise ValueError("an RS-KD shard needs num_draws >= 1")
    if not rskd and logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"unknown log-prob encoding {logprob_dtype!r} (known: {tuple(LOGPROB_DTYPES)})")
    tails = _check_temperatures(kind, tail_temperatures, draw_temperature)
    bits = id_bits(vocab_size)
    n = len(samples)
    for s in samples:
        if np.asarray(s.counts).shape != (seq_length,):
            raise ValueError(f"per-position counts {np.asarray(s.counts).shape} are not [{seq_length}]")
    cdt = count_dtype(max((int(np.max(s.counts)) for s in samples), default=0))
    lpd = None if rskd else logprob_dtype
    names = chunked_sections(kind, lpd, tails=bool(tails))
    compressed = [k for k in names if k not in _NEVER_COMPRESSED] if compression else []
    zc = _zstd_compressor() if compression else None
    chunks = {k: [] for k in names}
    for s in samples:
        for k, raw in _sample_chunks(s, kind, lpd, cdt, bits, num_draws, tails).items():
            chunks[k].append(zc.compress(raw) if k in compressed else raw)
    offsets = np.stack([np.concatenate([[0], np.cumsum([len(c) for c in chunks[k]])]) for k in names])
    parts = {"sample_hash": b"".join(s.hash for s in samples), "chunk_offsets": offsets.astype("<u8").tobytes()}
    parts.update({k: b"".join(chunks[k]) for k in names})
    header = shard_header(kind, first_sample, n, seq_length, vocab_size, lpd, cdt, compression, num_draws, tails,
                          draw_temperature)
    return seal(_lay_out(header, ("sample_hash", "chunk_offsets") + names, parts))


def shard_header(kind: str, first_sample: int, num_samples: int, seq_length: int, vocab_size: int,
                 logprob_dtype: Optional[str], cdt: np.dtype, compression: Optional[str], num_draws: Optional[int],
                 tail_temperatures: tuple = (), draw_temperature: float = 1.0) -> dict:
    """The JSON header of a shard :func:`encode_shard` writes (``sections`` still empty: the
    layout fills it in); ``megadistill.store.estimate`` sizes a shard from it. ``logprob_dtype``
    None for RS-KD; ``cdt`` the count dtype."""
    rskd = kind == "rskd"
    names = chunked_sections(kind, logprob_dtype, tails=bool(tail_temperatures))
    header = {
        "format_version": FORMAT_VERSION, "kind": kind, "first_sample": first_sample, "num_samples": num_samples,
        "seq_length": seq_length, "vocab_size": vocab_size, "id_bits": id_bits(vocab_size), "logprob_dtype": logprob_dtype,
        "residual_dtype": None if rskd else RESIDUAL_DTYPES[logprob_dtype], "count_dtype": np.dtype(cdt).str,
        "compression": compression, "compressed": [k for k in names if k not in _NEVER_COMPRESSED] if compression else [],
        "chunked": list(names), "sections": {},
    }
    if rskd:
        header.update(num_draws=num_draws, draw_dtype=count_dtype(num_draws).str, draw_temperature=float(draw_temperature))
    else:
        header.update(tail_temperatures=[float(t) for t in tail_temperatures])
    return header


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
