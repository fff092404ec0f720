"""Decoding a shard: :class:`Shard`, a view of one shard's bytes (versions 1 to 4) that checks
its header and sections and decodes one sample at a time (:mod:`megadistill.store.codec`), naming
the shard and sample in a ``StoreError`` when the bytes are not what the header describes; and
:func:`header_disagreements`, what a shard's header says against what a manifest (or a writer's
plan) declares.
"""

from __future__ import annotations

import json
import threading
from typing import Optional

import numpy as np

from megadistill.store.codec import FLOAT_DTYPES, LOGPROB_DTYPES, QLOG_STEP, dequantise_logprobs, entry_starts, unpack_ids
from megadistill.store.format import (
    KINDS, MAGIC, READABLE_VERSIONS, SAMPLE_HASH_BYTES, SEAL_BYTES, SEALED_VERSION, SECTIONS_V1, TEMPERED_VERSION,
    StoreError, chunked_sections,
)


class Shard:
    """A decoded view of one shard's bytes (a ``numpy.memmap`` or ``bytes``); nothing is copied
    until :meth:`sample` is called, and then only that sample's chunks (decompressed if need be).
    Reads format versions 1 to 4 (a version-3+ shard's trailing sha256 is not checked here: that
    takes a pass over every byte, ``format.sealed_sha256``). ``name`` is used in error messages.

    ``tail_temperatures``: the τ of a top-p-k shard's ``tails`` columns (empty: no tails, as in
    every shard before version 4); ``draw_temperature``: the τ an RS-KD shard's draws were made at
    (1.0 before version 4; None for top-p-k)."""

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
        end = max(o + n for o, n in h["sections"].values()) + (SEAL_BYTES if self.version >= SEALED_VERSION else 0)
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
        self._read_temperatures(h)
        expected = SECTIONS_V1[self.kind] if self.version == 1 else \
            ("sample_hash", "chunk_offsets") + chunked_sections(self.kind, self.logprob_dtype, bool(self.tail_temperatures))
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
            names = chunked_sections(self.kind, self.logprob_dtype, bool(self.tail_temperatures))
            offsets = sec["chunk_offsets"]
            if len(offsets) != len(names) * (n + 1) * 8:
                raise StoreError(f"shard {name} has {len(offsets)} bytes of chunk offsets for {n} samples (corrupt)")
            self._offsets = dict(zip(names, offsets.view("<u8").reshape(len(names), n + 1)))

    def _read_temperatures(self, h: dict) -> None:
        """The header's temperatures (version 4); older shards: no tails, draws at τ = 1."""
        self.tail_temperatures: tuple[float, ...] = ()
        self.draw_temperature: Optional[float] = 1.0 if self.kind == "rskd" else None
        if self.version < TEMPERED_VERSION:
            return
        key = "draw_temperature" if self.kind == "rskd" else "tail_temperatures"
        got = h.get(key)
        ok = (isinstance(got, (int, float)) and not isinstance(got, bool) and np.isfinite(got) and got > 0) \
            if self.kind == "rskd" else \
            (isinstance(got, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in got)
             and all(np.isfinite(t) and t > 0 and t != 1.0 for t in got) and got == sorted(set(got)))
        if not ok:
            raise StoreError(f"shard {self.name}: header {key} {got!r} is not what a version-{self.version} "
                             f"{self.kind} shard holds (corrupt)")
        if self.kind == "rskd":
            self.draw_temperature = float(got)
        else:
            self.tail_temperatures = tuple(float(t) for t in got)

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

    def sample_flat(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray],
                                               Optional[np.ndarray]]:
        """Global sample ``index`` as stored, flat: ``(counts[s], ids[Σ counts], logprobs[Σ counts]
        float32, residual[s] float32 or None, tails[s, T] float32 or None)``. ``tails[:, j]`` is
        ``log Σ_truncated p_i^(1/τ_j)`` for ``tail_temperatures[j]`` (``-inf`` where nothing is
        truncated), None for a shard without tail temperatures. RS-KD: the log-probs are those of
        the empirical distribution, ``log(draws / num_draws)``, and residual and tails are None."""
        i = self._local_index(index)
        counts = self._counts(i).astype(np.int64)
        ids = self._ids(i, counts)
        e = len(ids)
        if self.kind == "rskd":
            draws = self._view("draws", i, self._ddt)
            if len(draws) != e:
                raise StoreError(f"shard {self.name}, sample {index}: {len(draws)} draw counts for {e} ids (corrupt)")
            return counts, ids, self._log_frac[np.minimum(draws, self.num_draws)], None, None
        residual = self._view("residual", i, FLOAT_DTYPES[self.residual_dtype])
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
        tails = None
        if self.tail_temperatures:
            tails = self._view("tails", i, "<f4")
            if len(tails) != self.seq_length * len(self.tail_temperatures):
                raise StoreError(f"shard {self.name}, sample {index}: {len(tails)} tail values for {self.seq_length} "
                                 f"positions x {len(self.tail_temperatures)} tail temperatures (corrupt)")
            tails = tails.reshape(self.seq_length, len(self.tail_temperatures)).astype(np.float32)
        return counts, ids, lp, residual.astype(np.float32), tails

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Global sample ``index`` as ``(ids[s, k] int64 with -1 pads, logprobs[s, k] float32 with
        -inf pads, residual[s] float32, tails[s, T] float32 or None)``, k = its largest per-position
        count (tails: :meth:`sample_flat`). RS-KD: the log-probs are those of the empirical
        distribution, ``log(draws / num_draws)``, the residual is 0 and the tails None."""
        counts, ids, lp, residual, tails = self.sample_flat(index)
        if residual is None:
            residual = np.zeros(self.seq_length, dtype=np.float32)
        k = int(counts.max()) if counts.size else 0
        # Entry j of position t goes to flat slot t·k + j: its index minus the position's start, plus t·k.
        flat = np.arange(len(ids)) + np.repeat(np.arange(self.seq_length) * k - entry_starts(counts), counts)
        out_ids = np.full(self.seq_length * k, -1, dtype=np.int64)
        out_lp = np.full(self.seq_length * k, -np.inf, dtype=np.float32)
        out_ids[flat] = ids
        out_lp[flat] = lp
        return out_ids.reshape(self.seq_length, k), out_lp.reshape(self.seq_length, k), residual, tails

    def sample_draws(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RS-KD: global sample ``index``'s stored ``(ids[Σ counts], draws[Σ counts])``, flat."""
        i = self._local_index(index)
        ids = self._ids(i, self._counts(i).astype(np.int64))
        return ids, self._view("draws", i, self._ddt).astype(np.int64)


def header_disagreements(shard: Shard, declared: dict, first: int, count: int) -> list[str]:
    """What ``shard``'s header says against what the store ``declared`` (a manifest or a writer's
    plan: ``format_version``, ``kind``, ``encoding``, ``sampling``, ``truncation.temperatures``,
    ``identity.dataset.seq_length``) and against the sample range ``[first, first + count)`` the
    store's layout gives it: one phrase per disagreement (empty: none). A key the declaration lacks
    is not compared (a declaration older than format version 4 has no temperatures)."""
    h, enc = shard.header, declared.get("encoding", {})
    out = []
    if (shard.first_sample, shard.num_samples) != (first, count):
        out.append(f"holds samples {shard.first_sample}.. ({shard.num_samples}), the manifest's layout gives it "
                   f"{first}.. ({count})")
    seq = declared.get("identity", {}).get("dataset", {}).get("seq_length")
    said = {
        "format_version": (shard.version, declared.get("format_version")),
        "kind": (shard.kind, declared.get("kind")),
        "seq_length": (shard.seq_length, seq),
        "vocab_size": (h.get("vocab_size"), enc.get("vocab_size")),
        "id_bits": (shard.bits, enc.get("id_bits")),
        "compression": (h.get("compression"), enc.get("compression")),
    }
    if shard.kind == "rskd":
        sampling = declared.get("sampling", {})
        said["num_draws"] = (shard.num_draws, sampling.get("draws"))
        said["draw_dtype"] = (h.get("draw_dtype"), enc.get("draw_dtype"))
        said["draw_temperature"] = (shard.draw_temperature, sampling.get("temperature"))
    else:
        said["logprob_dtype"] = (shard.logprob_dtype, enc.get("logprob_dtype"))
        said["residual_dtype"] = (shard.residual_dtype, enc.get("residual_dtype"))
        temps = declared.get("truncation", {}).get("temperatures")
        # The manifest lists every temperature served, 1.0 (the residual) included; the header the tails' columns.
        said["tail_temperatures"] = (list(shard.tail_temperatures),
                                     None if temps is None else sorted(float(t) for t in temps if t != 1.0))
    for key, (got, want) in said.items():
        absent = want is None and (key != "compression" or "compression" not in enc)
        if not absent and got != want:
            out.append(f"its header has {key} {got!r}, the manifest {want!r}")
    return out
