"""The store's value codecs: how ids, counts, log-probs and residuals become bytes and back.

Ids are bit-packed to ``ceil(log2(vocab))`` bits (any vocabulary up to 2^32); per-position counts
take the narrowest unsigned integer that holds them. Log-probs are τ = 1, in one of
:data:`LOGPROB_DTYPES`: fp32, fp16 (rounded down, so ``1 - Σp`` stays a valid residual), or the
quantised ``qlog64`` / ``qlog16`` (:func:`quantise_logprobs`: a log-space grid of 1/64 or 1/16 nat,
one byte per gap between a position's sorted codes, the grid's level recovered from the residual
on decoding). The residual mass ``1 - Σp`` of the truncated ids is stored per position
(:data:`RESIDUAL_DTYPES`). Pure functions, arrays in, arrays out; ``megadistill.store.encode`` and
``megadistill.store.decode`` lay them out in shards.
"""

from __future__ import annotations

import numpy as np

# The dtype of one entry of the ``logprobs`` section, per log-prob encoding.
LOGPROB_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4"), "qlog64": np.dtype("|u1"), "qlog16": np.dtype("|u1")}
# Grid step (nats) of the quantised encodings.
QLOG_STEP = {"qlog64": 1 / 64, "qlog16": 1 / 16}
# The residual's dtype per log-prob encoding. A quantised shard recovers its log-probs' level from
# 1 - residual, which fp16 cannot resolve near residual 1 (a flat position's top-k): fp32 there.
RESIDUAL_DTYPES = {"fp16": "fp16", "fp32": "fp32", "qlog64": "fp32", "qlog16": "fp32"}
# The numpy dtype of a float encoding (log-probs or residuals).
FLOAT_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}
# A gap code of 255 means "the gap is the next value of logprob_overflow" (rare: a gap >= 255 steps).
_ESCAPE = 255


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
    out = lp.astype(FLOAT_DTYPES[dtype])
    if dtype == "fp16":
        up = out.astype(np.float64) > lp
        out[up] = np.nextafter(out[up], np.float16(-np.inf))
    return out


def entry_starts(counts: np.ndarray) -> np.ndarray:
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
    starts = entry_starts(counts)
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
    starts = entry_starts(counts)
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
    return np.clip(np.asarray(residual, dtype=np.float64), 0.0, 1.0).astype(FLOAT_DTYPES[dtype])
