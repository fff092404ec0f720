"""The predicted size of a logits store, from its on-disk layout (``FORMAT.md`` beside this file):
``megadistill plan`` shows it before a precompute or a recording run."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megadistill.config import ConfigError, RunConfig
from megadistill.kd.knobs import KnobSchedule
from megadistill.store.codec import LOGPROB_DTYPES, QLOG_STEP, RESIDUAL_DTYPES, count_dtype, id_bits
from megadistill.store.encode import shard_header
from megadistill.store.format import (
    DEFAULT_SAMPLES_PER_SHARD, MAGIC, MANIFEST, SEAL_BYTES, chunked_sections, served_temperatures,
)
from megadistill.store.recording_plan import recorded_temperatures
from megadistill.store.temperatures import store_temperatures
from megadistill.store.writer import shard_ranges

# --------------------------------------------------------------------------- logits store


@dataclass
class StoreSettings:
    """How a store is (to be) encoded: precompute-logits' flags, record_logits' keys or a manifest."""

    kind: str = "top_p_k"
    logprob_dtype: str = "fp16"
    draws: int = 12
    compression: Optional[str] = None
    samples_per_shard: int = 1024
    top_p: float = 1.0
    top_k: Optional[int] = None
    temperatures: tuple = (1.0,)
    """top_p_k: the temperatures served (a tail per τ ≠ 1); rskd: the one the draws are made at."""
    source: str = "precompute-logits defaults"


@dataclass
class StoreEstimate:
    """The predicted size of a logits store."""

    path: str
    settings: StoreSettings
    num_samples: int
    num_shards: int
    ids_per_position: int
    bytes: int
    exact: bool
    """True when the data cannot change the size (every position keeps the same number of ids)."""
    notes: list = field(default_factory=list)
    measured_bytes: Optional[int] = None
    """total_bytes of an existing store's manifest."""


def _shard_header_bytes(kind: str, first: int, n: int, seq: int, vocab: int, logprob_dtype: Optional[str],
                        count_str: str, compression: Optional[str], draws: Optional[int],
                        tail_temperatures: tuple = (), draw_temperature: float = 1.0) -> int:
    """Bytes before a shard's first section: magic, uint32 length and the space-padded JSON header
    (``megadistill.store.encode.shard_header``), whose room is reserved with 16-digit offsets
    (``megadistill.store.encode._lay_out``), padded to 8."""
    lpd = None if kind == "rskd" else logprob_dtype
    header = shard_header(kind, first, n, seq, vocab, lpd, count_str, compression, draws, tail_temperatures,
                          draw_temperature)
    header["sections"] = {k: [10**15, 10**15] for k in ("sample_hash", "chunk_offsets", *header["chunked"])}
    room = len(json.dumps(header, sort_keys=True)) + 8
    start = len(MAGIC) + 4 + room
    return start + (-start) % 8


def shard_bytes(kind: str, first: int, n: int, seq: int, vocab: int, per_position: int,
                logprob_dtype: Optional[str] = "fp16", draws: Optional[int] = None,
                compression: Optional[str] = None, tail_temperatures: tuple = (), draw_temperature: float = 1.0) -> int:
    """Bytes of one uncompressed version-4 shard of ``n`` samples whose every position holds
    ``per_position`` ids (``FORMAT.md``, "Shard layout"): header; ``sample_hash`` 16·n;
    ``chunk_offsets`` 8·(n+1) per chunked section; per sample ``counts`` s·count_dtype, ``residual``
    s·(2 or 4), ``ids`` ceil(s·k·id_bits/8), ``logprobs`` s·k·(2 or 4), or for qlog one byte per
    entry but each position's first and no ``logprob_overflow`` (gaps >= 255 steps, rare: 4 bytes
    each); ``tails`` s·4 per tail temperature (τ ≠ 1); RS-KD ``draws`` s·k·draw_dtype instead of
    residual, tails and log-probs. Sections 8-aligned;
    then the 32-byte sha256 seal.
    With zstd the result is the uncompressed size, an upper bound in practice."""
    def pad(x: int) -> int:
        return x + (-x) % 8

    bits = id_bits(vocab)
    cdt = count_dtype(per_position)
    entries = seq * per_position
    lpd = None if kind == "rskd" else logprob_dtype
    names = chunked_sections(kind, lpd, tails=bool(tail_temperatures))
    size = _shard_header_bytes(kind, first, n, seq, vocab, lpd, cdt.str, compression, draws, tail_temperatures,
                               draw_temperature)
    size += pad(16 * n) + pad(8 * len(names) * (n + 1))
    sections = {"counts": seq * cdt.itemsize, "ids": (entries * bits + 7) // 8}
    if kind == "rskd":
        sections["draws"] = entries * count_dtype(draws).itemsize
    else:
        sections["residual"] = seq * (2 if RESIDUAL_DTYPES[lpd] == "fp16" else 4)
        sections["tails"] = seq * 4 * len(tail_temperatures)
        sections["logprobs"] = entries - seq if lpd in QLOG_STEP else entries * LOGPROB_DTYPES[lpd].itemsize
        if lpd in QLOG_STEP:
            sections["logprob_overflow"] = 0
    return size + sum(pad(n * sections[k]) for k in names) + SEAL_BYTES


def store_settings(cfg: RunConfig, *, kind: Optional[str] = None, logprob_dtype: Optional[str] = None,
                   draws: Optional[int] = None, zstd: Optional[bool] = None,
                   samples_per_shard: Optional[int] = None) -> Optional[tuple[str, StoreSettings]]:
    """The store the run reads (teacher.mode offline: ``teacher.store``) or records
    (``record_logits.store``), and its encoding: a finished store's manifest if there is one, else
    ``record_logits.*``, else precompute-logits' flags given here (its defaults when None);
    top-p/top-k from ``kd.*`` (read) or ``record_logits.*`` (recorded). None: the run has no store."""
    if cfg.teacher.mode == "offline" and cfg.teacher.store:
        path = cfg.teacher.store
        st = StoreSettings(kind=kind or "top_p_k", logprob_dtype=logprob_dtype or "fp16", draws=draws or 12,
                           compression="zstd" if zstd else None,
                           samples_per_shard=samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
                           top_p=cfg.kd.top_p, top_k=cfg.kd.top_k,
                           source="precompute-logits flags" if any(x is not None for x in (kind, logprob_dtype, draws, zstd, samples_per_shard))
                           else "precompute-logits defaults")
        try:  # precompute-logits' default: the temperatures the run's KD steps take
            st.temperatures = store_temperatures(st.kind, None, KnobSchedule(cfg).kd_temperatures(), cfg.kd.truncation, "")
        except ConfigError:
            pass  # a store no precompute can make: preflight says so; size the τ = 1 part
    elif cfg.record_logits.store:
        r = cfg.record_logits
        path = r.store
        st = StoreSettings(kind=r.kind, logprob_dtype=r.logprob_dtype, draws=r.draws, compression=r.compression,
                           samples_per_shard=r.samples_per_shard, top_p=r.top_p, top_k=r.top_k,
                           temperatures=recorded_temperatures(cfg), source="record_logits")
    else:
        return None
    manifest = Path(path) / MANIFEST
    if manifest.is_file():
        try:
            mf = json.loads(manifest.read_text())
            enc = mf["encoding"]
            st.kind, st.compression = mf["kind"], enc.get("compression")
            st.samples_per_shard = mf["samples_per_shard"]
            st.temperatures = served_temperatures(mf)
            if st.kind == "rskd":
                st.draws = mf["sampling"]["draws"]
            else:
                st.logprob_dtype = enc["logprob_dtype"]
                st.top_p, st.top_k = mf["truncation"]["top_p"], mf["truncation"]["top_k"]
            st.source = f"the manifest of {path}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable manifest is preflight's and store verify's business; plan from the config
    return path, st


def store_estimate(cfg: RunConfig, vocab: int, path: str, st: StoreSettings) -> StoreEstimate:
    """The store's size for ``train_steps x global_batch_size`` samples of ``seq_length`` tokens.

    Ids per position: RS-KD keeps the distinct ids among its N draws (at most N; exactly 1 at
    N = 1); top-p-k keeps every id of the (padded) vocabulary without truncation, else at most
    top_k, or at most the vocabulary when only top_p truncates; a top_p < 1 keeps fewer on
    confident positions, and ids tied with the last kept one are kept (rare with fp32 logits). So
    the figure is exact when the count cannot vary (no truncation; top_p = 1 with top_k; RS-KD with
    N = 1) and an upper bound otherwise; with zstd it is the uncompressed size."""
    d = cfg.data
    num = cfg.training.train_steps * d.global_batch_size
    notes = []
    if st.kind == "rskd":
        k, exact = st.draws, st.draws == 1
        if not exact:
            notes.append(f"upper bound: every position's {st.draws} draws assumed distinct (FORMAT.md's benchmark: "
                         "7 distinct ids of 12 draws)")
    elif st.top_k is None and st.top_p >= 1.0:
        k, exact = vocab, True
    elif st.top_k is None:
        k, exact = vocab, False
        notes.append(f"upper bound: top_p {st.top_p} without top_k can keep the whole vocabulary at a flat position")
    else:
        k = min(st.top_k, vocab)
        exact = st.top_p >= 1.0
        if not exact:
            notes.append(f"upper bound: top_k {k} ids at every position (top_p {st.top_p} keeps fewer where the teacher is confident)")
    if st.compression:
        exact = False
        notes.append(f"{st.compression}: the uncompressed size (FORMAT.md's benchmark compresses to 0.7-0.8 of it)")
    if st.kind != "rskd" and st.logprob_dtype.startswith("qlog"):
        notes.append("qlog: gaps of 255 grid steps or more add 4 bytes each (not counted; rare)")
    tails = tuple(t for t in st.temperatures if t != 1.0) if st.kind == "top_p_k" else ()
    total = sum(shard_bytes(st.kind, first, n, d.seq_length, vocab, k, st.logprob_dtype, st.draws, st.compression,
                            tails, st.temperatures[0])
                for first, n in shard_ranges(num, st.samples_per_shard))
    measured = None
    mf = Path(path) / "manifest.json"
    if mf.is_file():
        try:
            measured = int(json.loads(mf.read_text())["total_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            measured = None
    return StoreEstimate(path, st, num, math.ceil(num / st.samples_per_shard), k, total, exact, notes, measured)


