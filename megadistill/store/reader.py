"""Reading a store: a memory-mapped, verified reader and the ``OfflineTeacher`` teacher source.

Checks, each a ``StoreError`` naming the shard and the sample:

* on open: the manifest's version and keys, its own checksum (``manifest_sha256``, format version 3
  on: a hand-edited manifest is refused), its temperatures (version 4) and its shard list against
  its sample counts; every shard file present with the size the manifest records (a truncated or
  missing shard fails before the first step);
* on a shard's first use (once per process): its sha256 against the manifest, and its header
  (sample range, kind, vocabulary, encoding, temperatures) against the manifest;
* per sample: that the store holds it, and that its token hash equals the hash of the batch's own
  ``tokens``/``labels`` (other data, seed, sequence length or tokenizer than the precompute's).

:func:`run_mismatches` says how a run differs from what a store was made for, including whether
the store serves every temperature of the run's KD steps exactly (:func:`serving_mismatch`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megadistill.config import data_seed
from megadistill.kd.knobs import KnobSchedule
from megadistill.store.decode import Shard, header_disagreements
from megadistill.store.format import (
    MANIFEST, PLAN, TEMPERED_VERSION, StoreError, bytes_sha256, check_manifest, is_protected, load_json, sample_hash,
    served_temperatures, shard_of, tail_temperatures,
)


class StoreReader:
    """Random access to a finished store by global sample index. ``verify=False`` skips the
    per-shard sha256 (the size checks at open remain)."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        manifest = load_json(self.path / MANIFEST)
        if manifest is None:
            hint = ""
            if (self.path / PLAN).is_file():
                hint = " (a precompute is in progress or was killed: run megadistill precompute-logits again)"
            elif (self.path / "pending").is_dir():  # megadistill.store.recorder's staging directory
                hint = (" (a run recording its own logits (record_logits.store) is in progress or was killed: "
                        "resume that training run to finish the store)")
            what = "does not exist" if not self.path.exists() else f"has no {MANIFEST}{hint}"
            raise StoreError(f"logits store {self.path} {what}")
        check_manifest(manifest, f"logits store {self.path}")
        self.manifest = manifest
        # Stores written before format version 3 carry no manifest checksum (``store info`` says so).
        self.protected = is_protected(manifest)
        self.num_samples = int(manifest["num_samples"])
        self.samples_per_shard = int(manifest["samples_per_shard"])
        # The τ of the tails' columns (each shard's header is held to them on first use) and, RS-KD,
        # the τ the draws were made at.
        self.tail_temperatures = tail_temperatures(manifest)
        self.draw_temperature = served_temperatures(manifest)[0] if manifest["kind"] == "rskd" else None
        self.verify = verify
        self._shards: dict[int, Shard] = {}
        # A prefetch thread and the training thread may open a shard at once: verify it only once.
        self._lock = threading.Lock()
        for entry in manifest["shards"]:
            f = self.path / entry["file"]
            if not f.is_file():
                raise StoreError(f"logits store {self.path}: shard {entry['file']} is missing")
            size = f.stat().st_size
            if size != entry["bytes"]:
                raise StoreError(
                    f"logits store {self.path}: shard {entry['file']} is {size} bytes, the manifest records "
                    f"{entry['bytes']} (truncated or rewritten); samples {entry['first_sample']}.."
                    f"{entry['first_sample'] + entry['num_samples'] - 1} cannot be read"
                )

    @property
    def identity(self) -> dict:
        return self.manifest["identity"]

    def shard(self, index: int) -> Shard:
        """Shard ``index`` (memory-mapped; its checksum verified on first use)."""
        shard = self._shards.get(index)
        if shard is not None:
            return shard
        with self._lock:
            if index not in self._shards:
                self._shards[index] = self._open(index)
            return self._shards[index]

    def _open(self, index: int) -> Shard:
        entry = self.manifest["shards"][index]
        buf = np.memmap(self.path / entry["file"], dtype=np.uint8, mode="r")
        if self.verify:
            got = bytes_sha256(buf)
            if got != entry["sha256"]:
                raise StoreError(
                    f"logits store {self.path}: shard {entry['file']} fails its checksum (sha256 {got[:12]}…, "
                    f"manifest {entry['sha256'][:12]}…): samples {entry['first_sample']}.."
                    f"{entry['first_sample'] + entry['num_samples'] - 1} are corrupt"
                )
        shard = Shard(buf, entry["file"])
        problems = header_disagreements(shard, self.manifest, entry["first_sample"], entry["num_samples"])
        if problems:
            raise StoreError(f"logits store {self.path}: shard {entry['file']} contradicts {MANIFEST}: "
                             + "; ".join(problems))
        return shard

    def _shard_of_sample(self, index: int) -> Shard:
        if not 0 <= index < self.num_samples:
            raise StoreError(
                f"logits store {self.path} holds samples 0..{self.num_samples - 1}; sample {index} is not in it "
                "(the student trains longer or on larger batches than the precompute covered)"
            )
        return self.shard(shard_of(index, self.samples_per_shard))

    def check(self, index: int, tokens, labels) -> None:
        """Raise ``StoreError`` unless ``tokens``/``labels`` are the ones sample ``index`` was stored for."""
        shard = self._shard_of_sample(index)
        want = bytes(shard.hashes[index - shard.first_sample])
        if sample_hash(tokens, labels) != want:
            raise StoreError(
                f"logits store {self.path}, shard {shard.name}: sample {index}'s tokens differ from the ones "
                "its targets were computed for (other data, seed, sequence length or tokenizer than the "
                "precompute's, or a sample order built for another number of samples: over a corpus of several "
                "epochs it depends on it, so set data.train_samples to the storing run's)"
            )

    def sample(self, index: int, tokens=None, labels=None):
        """``(ids[s, k], logprobs[s, k], residual[s], tails[s, T] or None)`` of global sample
        ``index`` (see ``Shard.sample``); with ``tokens``/``labels`` given, checks they are the
        stored sample's."""
        shard = self._shard_of_sample(index)
        if tokens is not None:
            self.check(index, tokens, labels)
        return shard.sample(index)

    def batch(self, indices, tokens=None, labels=None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                                 Optional[np.ndarray]]:
        """Samples ``indices[b]`` as ``(ids[b, s, k], logprobs[b, s, k], residual[b, s], tails[b, s, T])``,
        padded to the batch's largest count with -1 / -inf; ``tokens``/``labels`` ``[b, s]`` are
        checked per sample. ``residual`` is the stored truncated mass (float32), None for an RS-KD
        store (an empirical distribution has no truncated mass: the loss then treats it as
        renormalised). ``tails`` (float32) are the truncated ids' tempered log-mass at
        :attr:`tail_temperatures`, None for a store without tail temperatures."""
        rows = [self.sample(int(i), None if tokens is None else tokens[j], None if labels is None else labels[j])
                for j, i in enumerate(indices)]
        k = max(r[0].shape[-1] for r in rows)
        ids = np.full((len(rows), rows[0][0].shape[0], k), -1, dtype=np.int64)
        lp = np.full(ids.shape, -np.inf, dtype=np.float32)
        for j, (i, p, _, _) in enumerate(rows):
            ids[j, :, : i.shape[-1]] = i
            lp[j, :, : p.shape[-1]] = p
        residual = None if self.manifest["kind"] == "rskd" else np.stack([r[2] for r in rows])
        tails = np.stack([r[3] for r in rows]) if self.tail_temperatures else None
        return ids, lp, residual, tails


def _listed(values, most: int = 8) -> str:
    """Temperatures for a message: all of them, or the first few, the last and how many."""
    values = list(values)
    if len(values) <= most:
        return ", ".join(f"{t:g}" for t in values)
    return ", ".join(f"{t:g}" for t in values[: most - 2]) + f", ..., {values[-1]:g} ({len(values)} values)"


def serving_mismatch(manifest: dict, truncation: str, run_temperatures) -> Optional[str]:
    """Why store ``manifest`` cannot give exact targets to a KD loss with ``kd.truncation``
    ``truncation`` at each of ``run_temperatures`` (the τ its KD steps take), or None.

    RS-KD: the draws' empirical distribution is unbiased for the teacher at τ_s only, so every τ
    must be τ_s. Top-p-k with a ghost bucket: every τ must be one the store recorded the tempered
    tail mass at (:func:`megadistill.store.format.served_temperatures`: 1 alone before format
    version 4). Renormalised truncation uses the kept ids' τ = 1 log-probs at any τ exactly."""
    served = served_temperatures(manifest)
    wanted = sorted({float(t) for t in run_temperatures})
    have = f"{_listed(served)}" + ("" if manifest["format_version"] >= TEMPERED_VERSION else
                                   f" (format version {manifest['format_version']}, made before stores recorded temperatures)")
    if manifest["kind"] == "rskd":
        if all(t == served[0] for t in wanted):
            return None
        fix = (f"make the store with precompute-logits --format rskd --temperatures {wanted[0]:g}" if len(wanted) == 1
               else "draws serve one constant τ: use a top_p_k store for a τ schedule")
        return (f"the run's KD steps take τ {_listed(wanted)} (kd.temperature, kd.temperature_schedule) but the store's "
                f"RS-KD draws were made at τ {have}, an unbiased target at that τ only: {fix}, or train at τ {served[0]:g}")
    if truncation != "ghost":
        return None
    missing = [t for t in wanted if t not in served]
    if not missing:
        return None
    need = sorted(set(served) | set(wanted))
    if all(float(f"{t:g}") == t for t in need):
        fix = f"make the store with precompute-logits --temperatures {','.join(f'{t:g}' for t in need)}"
    else:  # a schedule's values, which a short decimal would miss: precompute's default is exactly them
        fix = "make the store with precompute-logits on this run's settings without --temperatures (it then records " \
              "every τ the run's KD steps take)"
    return (f"kd.truncation ghost at τ {_listed(wanted)} (kd.temperature, kd.temperature_schedule) needs the teacher's "
            f"tempered mass on the truncated ids at each τ, but the store holds it for τ {have} only (missing: "
            f"{_listed(missing)}): {fix}, or use kd.truncation renormalize")


def run_mismatches(manifest: dict, cfg, vocab_size: Optional[int] = None,
                   tokenizer_sha256: Optional[str] = None) -> list[str]:
    """How run ``cfg`` disagrees with the store ``manifest`` was made for: one message per problem
    (empty: the store fits). Checks what the config names, and that the store serves every τ
    the run's KD steps take (:func:`serving_mismatch`); the per-sample token hashes, checked
    while reading, catch any other difference in the data."""
    ident, problems = manifest["identity"], []
    ds = ident["dataset"]
    for key, now in (("seq_length", cfg.data.seq_length), ("split", cfg.data.split), ("seed", data_seed(cfg))):
        if ds.get(key) != now:
            where = "data.seed (or training.seed)" if key == "seed" else f"data.{key}"
            problems.append(f"{where} is {now!r} but the store was made with {ds.get(key)!r}")
    if cfg.data.data_prefix is not None and ds.get("data_prefix") not in (None, str(Path(cfg.data.data_prefix).resolve())):
        problems.append(f"data.data_prefix {cfg.data.data_prefix} is not the store's data {ds.get('data_prefix')}")
    # An RS-KD store is not truncated: kd.top_p/top_k (which the sparse loss does not apply) need
    # not match anything.
    trunc = manifest.get("truncation", {})
    for key in ("top_p", "top_k") if manifest.get("kind", "top_p_k") == "top_p_k" else ():
        if trunc.get(key) != getattr(cfg.kd, key):
            problems.append(
                f"kd.{key} is {getattr(cfg.kd, key)!r} but the store keeps top_p={trunc.get('top_p')!r}, "
                f"top_k={trunc.get('top_k')!r} (set the same kd.top_p/kd.top_k as the precompute)"
            )
    needed = cfg.training.train_steps * cfg.data.global_batch_size
    if manifest["num_samples"] < needed:
        problems.append(
            f"the run reads samples 0..{needed - 1} (training.train_steps x data.global_batch_size) but the store "
            f"holds only 0..{manifest['num_samples'] - 1}"
        )
    if vocab_size is not None and manifest["encoding"]["vocab_size"] != vocab_size:
        problems.append(f"the student's padded vocabulary is {vocab_size}, the store's {manifest['encoding']['vocab_size']}")
    if tokenizer_sha256 is not None and ident.get("tokenizer_sha256") != tokenizer_sha256:
        problems.append(
            f"the run's tokenizer (sha256 {tokenizer_sha256[:12]}…) is not the store's "
            f"({str(ident.get('tokenizer_sha256'))[:12]}…)"
        )
    serving = serving_mismatch(manifest, cfg.kd.truncation, KnobSchedule(cfg).kd_temperatures())
    if serving:
        problems.append(serving)
    return problems


class OfflineTeacher:
    """A ``TeacherSource`` reading sparse targets from a store: no teacher model is built.

    ``split(batch, output)`` looks the batch's global sample ``indices[b]`` up and returns
    ``(output, SparseLogits(ids[b, s, k], logprobs[b, s, k], residual[b, s], tails[b, s, T],
    temperatures, drawn_at))`` on the output's device, the same targets on every tensor-parallel
    rank; ``residual`` is the stored truncated mass (the loss's ghost bucket at τ = 1), None for
    an RS-KD store; ``tails`` the truncated ids' tempered log-mass at each of ``temperatures``
    (the store's tail temperatures; None and () for a store without); ``drawn_at`` the τ an RS-KD
    store's draws were made at (None for top-p-k). ``vocab_size`` (the student's padded
    vocabulary) must be the store's.

    Prefetch: a step's micro-batches are built before the step and ``split`` is called on them in
    order, after each one's forward, so decoding them there would stall the step. After serving a
    micro-batch, ``split`` hands the next ``prefetch`` micro-batches' decoding to a background
    thread; it predicts their indices from the ones seen so far (contiguous runs of micro-batches,
    and the jump between steps once one has been seen, as ``ContiguousSampler`` hands them out at
    any DP size). A mispredicted prefetch is simply not used: that micro-batch is decoded
    synchronously. A failed prefetch is never replaced by a synchronous read: whatever the
    background thread raised is raised in the training thread by the ``split`` that needs that
    micro-batch, as a ``StoreError`` naming the shard file(s) it was read from (the original error
    chained as its cause). A failed guess that no micro-batch asks for (mispredicted, or still
    pending at ``close``) raises nothing. The token hashes are always checked against the actual
    batch. ``prefetch=0`` decodes synchronously.
    """

    def __init__(self, store: str | Path, vocab_size: Optional[int] = None, seq_length: Optional[int] = None,
                 verify: bool = True, prefetch: int = 2) -> None:
        self.reader = StoreReader(store, verify=verify)
        enc = self.reader.manifest["encoding"]
        if vocab_size is not None and enc["vocab_size"] != vocab_size:
            raise StoreError(
                f"logits store {store} was made with vocabulary size {enc['vocab_size']}, the student's is {vocab_size} "
                "(same tokenizer and padding needed)"
            )
        stored_seq = self.reader.identity["dataset"]["seq_length"]
        if seq_length is not None and stored_seq != seq_length:
            raise StoreError(f"logits store {store} was made for data.seq_length {stored_seq}, this run has {seq_length}")
        self.active = True
        self._seconds = 0.0
        self.prefetch = prefetch
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[tuple, Future] = {}
        self._expect: Optional[int] = None  # the index a contiguous continuation would start at
        self._run = 0  # micro-batches in the current contiguous run
        self._run_len: Optional[int] = None  # learned: micro-batches per contiguous run (per step and rank)
        self._jump = 0  # learned: index gap between the end of one run and the start of the next
        self.hits = self.misses = 0

    @classmethod
    def for_run(cls, cfg, vocab_size: int, tokenizer_sha256: Optional[str] = None) -> "OfflineTeacher":
        """The source for run ``cfg``, after checking the store was made for it (``run_mismatches``)."""
        source = cls(cfg.teacher.store, vocab_size, cfg.data.seq_length)
        problems = run_mismatches(source.reader.manifest, cfg, vocab_size, tokenizer_sha256)
        if problems:
            raise StoreError(f"teacher.store {cfg.teacher.store} was not made for this run: " + "; ".join(problems))
        return source

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        return student

    def set_active(self, active: bool) -> None:
        self.active = active

    def prepare(self, micro_batches: list[dict], knobs) -> None:
        pass  # targets are read per micro-batch (and prefetched)

    def take_seconds(self) -> Optional[float]:
        s, self._seconds = self._seconds, 0.0
        return s

    def _decode(self, indices: tuple, tokens=None, labels=None) -> tuple:
        """``(ids[b, s, k], logprobs[b, s, k], residual[b, s] or None, tails[b, s, T] or None)``
        tensors of samples ``indices[b]``."""
        ids, lp, res, tails = self.reader.batch(list(indices), tokens, labels)
        return (torch.from_numpy(ids), torch.from_numpy(lp), None if res is None else torch.from_numpy(res),
                None if tails is None else torch.from_numpy(tails))

    def _prefetch(self, indices: tuple) -> tuple:
        """:meth:`_decode` in the prefetch thread; a failure becomes a ``StoreError`` naming the shard
        file(s) of ``indices`` (raised where ``split`` takes the result)."""
        try:
            return self._decode(indices)
        except Exception as e:
            reader = self.reader
            files = sorted({reader.manifest["shards"][shard_of(i, reader.samples_per_shard)]["file"]
                            for i in indices if 0 <= i < reader.num_samples})
            raise StoreError(
                f"logits store {reader.path}: prefetching samples {indices[0]}..{indices[-1]} from "
                f"{', '.join(files) or 'no shard'} failed: {type(e).__name__}: {e}"
            ) from e

    def _observe(self, indices: list) -> None:
        """Learn the index pattern from the micro-batch just requested."""
        if self._expect is not None and indices[0] != self._expect:
            self._run_len, self._jump, self._run = self._run, indices[0] - self._expect, 1
        else:
            self._run += 1
        self._expect = indices[-1] + 1

    def _predict(self, n: int) -> list[tuple]:
        """The index tuples of the next ``n`` micro-batches of size ``size`` the pattern predicts."""
        out, start, run = [], self._expect, self._run
        size = self._size
        for _ in range(n):
            if self._run_len and run % self._run_len == 0:
                start, run = start + self._jump, 0
            if start < 0 or start + size > self.reader.num_samples:
                break
            out.append(tuple(range(start, start + size)))
            start, run = start + size, run + 1
        return out

    def _schedule(self) -> None:
        wanted = self._predict(self.prefetch)
        for key in list(self._pending):
            if key not in wanted:  # a stale guess: drop it (it may still finish in the background)
                self._pending.pop(key).cancel()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megadistill-store-prefetch")
        for key in wanted:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._prefetch, key)

    def split(self, batch: dict, output):
        if not self.active:
            return output, None
        from megadistill.kd.teacher import SparseLogits

        t0 = time.perf_counter()
        indices = batch["indices"].tolist()
        tokens, labels = batch["tokens"].cpu().numpy(), batch["labels"].cpu().numpy()
        key = tuple(indices)
        fut = self._pending.pop(key, None)
        contiguous = indices == list(range(indices[0], indices[0] + len(indices))) if indices else False
        if self.prefetch > 0 and contiguous:
            self._size = len(indices)
            self._observe(indices)
            self._schedule()  # queued behind nothing: the worker starts on the next batches now
        # A failed prefetch raises here, in the training thread (no synchronous retry hides it).
        got = None if fut is None else fut.result()
        if got is not None:
            self.hits += 1
            for j, i in enumerate(indices):
                self.reader.check(i, tokens[j], labels[j])
            ids, lp, res, tails = got
        else:
            self.misses += 1
            ids, lp, res, tails = self._decode(tuple(indices), tokens, labels)
        dev = output.device
        reader = self.reader
        target = SparseLogits(ids.to(dev), lp.to(dev), None if res is None else res.to(dev),
                              None if tails is None else tails.to(dev),
                              reader.tail_temperatures if tails is not None else (), reader.draw_temperature)
        self._seconds += time.perf_counter() - t0
        return output, target

    def close(self) -> None:
        """Stop the prefetch thread (pending guesses are dropped)."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def release(self) -> None:
        """KD is over for this run (SALT): stop prefetching; later micro-batches get no target."""
        self.close()
        self.active = False
