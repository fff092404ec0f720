"""Online logits (``record_logits:``): a plain pre-training run records its own targets into a
logits store while it trains, so a model family's largest run leaves targets for its smaller
members (the PD paper's "online logits").

The recorder is a ``TeacherSource`` (``megadistill.kd.teacher``) that never supplies a target:
its ``split(batch, output)`` sees every training micro-batch's student logits ``[b, s, v/tp]``
on the last pipeline stage, runs the same TP-aware selection as ``precompute-logits``
(``select_top_p_k``, or ``sample_rskd`` with ``rskd_uniforms``) on the detached logits, and
writes the result in the store format (``FORMAT.md``). Validation forwards are not recorded:
both backends put the model in eval mode for them (``module.eval()``), so a forward whose model
is not in training mode is skipped.

What a recorded sample is: global sample ``i`` is seen once, in the forward of step
``i // global_batch_size`` (the ``ContiguousSampler`` order), with the weights after that many
optimizer steps; its targets are those logits (τ = 1, dropout as configured: this is the training
forward). The store covers samples ``0 .. train_steps × global_batch_size − 1`` in shards of
global sample ranges, so neither its bytes nor its layout depend on the DP size.

Files, beside the store's own (``manifest.json``, ``precompute.json``: the plan, ``shard-*.bin``):
staging *pieces* under ``pending/`` (``megadistill.store.pieces``), the targets of consecutive
samples of one shard. Each DP rank's tensor-parallel rank 0 writes one per micro-batch (and
shard), atomically. A shard is assembled from its pieces by its owner rank (DP rank ``shard mod
DP``) once every one of its samples was seen before the run's latest complete checkpoint: no
resume (which starts from that checkpoint or a later one) will see them again. Then its pieces
are deleted. ``manifest.json`` is written at the end of the run; what it says about the recording
(its plan and teacher identity) is ``megadistill.store.recording_plan``.

Resume after a kill: the generation is one more than any piece's on disk, so a resumed process's
pieces supersede those a killed process wrote after its last checkpoint (they are re-recorded,
from the same weights when the resume is exact); a piece or shard is complete or absent (atomic
writes), and a shard is written once, from complete data. A shard found on disk is trusted only
if its bytes hash to the sha256 sealed into it (``writer.verified_shards``; a damaged one is a
``StoreError`` naming it: its samples cannot be seen again), a piece only if its zip CRC-32s hold
(``pieces.decode_piece``). Samples of a shard that was already
finished (a resume from an older checkpoint than the latest) are not recorded again.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megadistill.collective import on_rank0 as _on_rank0
from megadistill.store.encode import SampleTargets, encode_shard
from megadistill.store.format import StoreError, sample_hash, shard_name, shard_of
from megadistill.store.pieces import PENDING, assemble_shard, encode_piece, list_pieces, piece_name
from megadistill.store.recording_plan import data_files, dataset_identity, recorded_temperatures, recording_plan

logger = logging.getLogger(__name__)

# ``writer.write_atomic``'s temporary names for pieces and shards (``.NAME.tmp-PID-HOST``; older
# versions wrote ``.NAME.tmp-PID``).
_STALE_TMP = re.compile(r"^\.(piece-\d{12}-\d{6}-g\d{6}|shard-\d{6})\.bin\.tmp-\d+(-[A-Za-z0-9._-]+)?$")


def _checkpoint_step(path: Optional[Path]) -> int:
    """The step of a ``step_XXXXXXXX`` checkpoint directory (0 without one)."""
    return int(path.name.split("_", 1)[1]) if path is not None else 0


class LogitsRecorder:
    """The ``record_logits`` teacher source (see the module doc): plain LM training (no target),
    recording each training micro-batch's targets into ``cfg.record_logits.store``.

    Built on every rank after ``torch.distributed`` and Megatron's parallel state (collective:
    rank 0 checks or begins the store and picks this process's generation)."""

    def __init__(self, cfg, vocab_size: int) -> None:
        from megatron.core import parallel_state

        from megadistill.hashing import file_sha256
        from megadistill.losses.config import KDLossConfig
        from megadistill.store import writer

        r = cfg.record_logits
        self.cfg = cfg
        self.store = Path(r.store)
        self.pending = self.store / PENDING
        self.kind = r.kind
        self.vocab_size = vocab_size
        self.seq_length = cfg.data.seq_length
        self.global_batch = cfg.data.global_batch_size
        self.samples_per_shard = r.samples_per_shard
        self.logprob_dtype = None if r.kind == "rskd" else r.logprob_dtype
        self.draws = r.draws if r.kind == "rskd" else None
        self.compression = r.compression
        self.seed = cfg.training.seed
        # The selection precompute-logits applies (only top_p/top_k matter to select_top_p_k).
        self.truncation = KDLossConfig(top_p=r.top_p, top_k=r.top_k)
        temps = recorded_temperatures(cfg)
        self.draw_temperature = temps[0]
        self.tail_temperatures = tuple(t for t in temps if t != 1.0) if r.kind == "top_p_k" else ()
        self.ckpt_root = Path(cfg.output_dir) / "checkpoints"
        self.num_samples = cfg.training.train_steps * cfg.data.global_batch_size
        self.ranges = writer.shard_ranges(self.num_samples, self.samples_per_shard)

        def begin():
            _, tok_path = data_files(cfg)
            plan = recording_plan(cfg, vocab_size, file_sha256(tok_path), dataset_identity(cfg))
            self.pending.mkdir(parents=True, exist_ok=True)
            try:
                writer.begin(self.store, plan)
            except StoreError as e:
                differs = re.search(r"\(differs in: [^)]*\)", str(e))
                if differs is None:
                    raise  # not another run's store: a damaged manifest, another format version
                raise StoreError(
                    f"record_logits.store {self.store} holds a store recorded or precomputed for another run or "
                    f"other settings {differs.group(0)}; give another record_logits.store "
                    "or remove that directory"
                ) from e
            # A shard written before the kill is trusted by its content only. Its samples were seen
            # before the checkpoint this run resumes from and its pieces are gone: a damaged one
            # cannot be recorded again.
            verified, damaged = writer.verified_shards(self.store, plan)
            if damaged:
                i = min(damaged)
                more = f" (and {len(damaged) - 1} more shards)" if len(damaged) > 1 else ""
                raise StoreError(
                    f"record_logits.store {self.store}: {shard_name(i)} is not trusted: {damaged[i]}{more}; its samples "
                    f"{self.ranges[i][0]}..{sum(self.ranges[i]) - 1} were recorded before the checkpoint this run "
                    "resumes from and cannot be recorded again: restore the shard from a copy, or record again "
                    "with a new record_logits.store"
                )
            finished = sorted(verified)
            generation = 1 + max((g for _, _, g, _ in list_pieces(self.pending)), default=-1)
            return plan, finished, generation

        self.plan, finished, self.generation = _on_rank0(begin)
        # Fixed for the process, identical on every rank: TP ranks must take the same samples
        # through select_top_p_k's collectives. Shards finished later are never recorded again.
        self.finished_at_start = frozenset(finished)
        self.finished = set(finished)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        # Only the last pipeline stage holds logits (the others' outputs are hidden states).
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.writes = parallel_state.get_tensor_model_parallel_rank() == 0 and self.last_stage
        self._owned = [i for i in range(len(self.ranges)) if i % self.dp == self.dp_rank]
        self._student: Optional[torch.nn.Module] = None
        self._step: Optional[int] = None
        self._seconds = 0.0
        self._warned = False
        self.pieces_written = 0

    @classmethod
    def for_run(cls, cfg, vocab_size: int) -> "LogitsRecorder":
        return cls(cfg, vocab_size)

    # ------------------------------------------------------------------ TeacherSource

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        self._student = student
        return student

    def set_active(self, active: bool) -> None:
        pass  # the recording does not depend on the KD weight (there is no KD)

    def prepare(self, micro_batches: list[dict], knobs) -> None:
        pass  # it records the student's logits as they come

    def release(self) -> None:
        pass

    def take_seconds(self) -> Optional[float]:
        s, self._seconds = self._seconds, 0.0
        return s

    def split(self, batch: dict, output):
        """``(output, None)``; records ``output``'s targets when the model is training."""
        if not self.last_stage or (self._student is not None and not self._student.training):
            return output, None  # hidden states, or a validation forward
        t0 = time.perf_counter()
        with torch.no_grad():
            self._record(batch, output.detach())
        self._seconds += time.perf_counter() - t0
        return output, None

    def close(self) -> None:
        """At the end of the run (collective): assemble the remaining shards, write the manifest."""
        from megadistill.checkpoint_dir import COMPLETE_MARKER, latest_checkpoint
        from megadistill.hashing import file_sha256
        from megadistill.store import writer

        dist.barrier()  # every rank's last pieces are on disk
        problem = None
        if self.writes:
            try:
                self._assemble_upto(self.cfg.training.train_steps, strict=True)
            except (StoreError, OSError) as e:
                problem = f"{type(e).__name__}: {e}"
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problems = [p for p in problems if p]
        if problems:
            raise StoreError("; ".join(dict.fromkeys(problems)))

        def finish():
            final = latest_checkpoint(self.ckpt_root)
            recording = {"final_checkpoint": str(final.resolve()) if final else None,
                         "final_checkpoint_marker_sha256": file_sha256(final / COMPLETE_MARKER) if final else None}
            manifest = writer.finish(self.store, {**self.plan, "recording": recording})
            for _, _, _, p in list_pieces(self.pending):
                p.unlink(missing_ok=True)  # left over from a shard finished before a kill
            for folder in (self.pending, self.store):
                # Every writer is done: a temporary file is a killed process's unfinished write.
                for p in folder.glob(".*.tmp-*") if folder.is_dir() else ():
                    if _STALE_TMP.match(p.name):
                        p.unlink(missing_ok=True)
            try:
                self.pending.rmdir()
            except OSError:
                pass  # a foreign file in it: leave it to the user
            return manifest["total_bytes"]

        _on_rank0(finish)

    # ------------------------------------------------------------------ recording

    def _record(self, batch: dict, logits: torch.Tensor) -> None:
        """Select the targets of one training micro-batch (``batch``: ``[b, s]`` tensors and the
        ``[b]`` global sample ``indices``; ``logits[b, s, v/tp]`` detached, this rank's vocab
        shard) on every TP rank, and write them as pieces on TP rank 0."""
        from megadistill.store.sparse import rskd_uniforms, sample_rskd, select_top_p_k

        indices = [int(i) for i in batch["indices"].tolist()]
        if not indices:
            return
        if max(indices) >= self.num_samples or min(indices) < 0:
            raise StoreError(f"record_logits: sample {max(indices)} is outside the recorded range "
                             f"0..{self.num_samples - 1} (training.train_steps x data.global_batch_size)")
        step = indices[0] // self.global_batch
        if step != self._step:
            self._step = step
            if self.writes:
                # Every rank finished the earlier steps' forwards (and wrote their pieces) before
                # the gradient reduction of the step before this one.
                from megadistill.checkpoint_dir import latest_checkpoint

                self._assemble_upto(min(step, _checkpoint_step(latest_checkpoint(self.ckpt_root))))
        keep = [j for j, i in enumerate(indices) if shard_of(i, self.samples_per_shard) not in self.finished_at_start]
        if len(keep) < len(indices) and not self._warned:
            self._warned = True
            logger.warning("record_logits.store %s already holds finished shards for samples this run sees again "
                           "(it started before the step they were recorded in: a resume from an earlier checkpoint "
                           "than the latest, or --overwrite): they are kept, not re-recorded", self.store)
        if not keep:
            return
        if len(keep) < len(indices):
            logits = logits[torch.as_tensor(keep, device=logits.device)]
        b, s = logits.shape[0], logits.shape[1]
        x = logits.reshape(b * s, logits.shape[-1])
        kept_indices = [indices[j] for j in keep]
        if self.kind == "rskd":
            u = rskd_uniforms(self.seed, np.repeat(np.asarray(kept_indices), s), np.tile(np.arange(s), b), self.draws)
            ids, counts = sample_rskd(x, torch.from_numpy(u), self.tp_group, temperature=self.draw_temperature)
            ids, counts = ids.reshape(b, s, -1).cpu().numpy(), counts.reshape(b, s, -1).cpu().numpy()
        else:
            ids, lp, res, tails = select_top_p_k(x, self.truncation, self.tp_group, self.tail_temperatures)
            ids, lp = ids.reshape(b, s, -1).cpu().numpy(), lp.reshape(b, s, -1).cpu().numpy()
            res, tails = res.reshape(b, s).cpu().numpy(), tails.reshape(b, s, -1).cpu().numpy()
        if not self.writes:
            return
        tokens, labels = batch["tokens"].cpu().numpy(), batch["labels"].cpu().numpy()
        samples = []
        for j, row in enumerate(keep):
            valid = ids[j] >= 0
            h = sample_hash(tokens[row], labels[row])
            if self.kind == "rskd":
                samples.append(SampleTargets(h, valid.sum(-1), None, ids[j][valid], None, draws=counts[j][valid]))
            else:
                samples.append(SampleTargets(h, valid.sum(-1), res[j], ids[j][valid], lp[j][valid],
                                             tails=tails[j] if self.tail_temperatures else None))
        self._write_pieces(kept_indices, samples)

    def _write_pieces(self, indices: list[int], samples: list[SampleTargets]) -> None:
        """One piece per run of consecutive indices inside one shard."""
        from megadistill.store import writer

        start = 0
        for k in range(1, len(indices) + 1):
            if k == len(indices) or indices[k] != indices[k - 1] + 1 or \
                    shard_of(indices[k], self.samples_per_shard) != shard_of(indices[start], self.samples_per_shard):
                first, run = indices[start], samples[start:k]
                name = piece_name(first, len(run), self.generation)
                writer.write_atomic(self.pending / name, encode_piece(first, run))
                self.pieces_written += 1
                start = k

    def _assemble_upto(self, bound: int, strict: bool = False) -> None:
        """Assemble this rank's unfinished shards whose samples all belong to steps before
        ``bound``. ``strict``: a shard lacking samples is an error (else it waits)."""
        ready = [i for i in self._owned if i not in self.finished
                 and (self.ranges[i][0] + self.ranges[i][1] - 1) // self.global_batch < bound]
        if not ready:
            return
        pieces: dict[int, list] = {}
        for first, count, gen, path in list_pieces(self.pending):
            pieces.setdefault(shard_of(first, self.samples_per_shard), []).append((gen, first, count, path))
        missing = []
        for i in ready:
            if self._assemble(i, pieces.get(i, [])):
                self.finished.add(i)
            else:
                missing.append(i)
        if strict and missing:
            lo, hi = self.ranges[missing[0]][0], self.ranges[missing[-1]][0] + self.ranges[missing[-1]][1] - 1
            raise StoreError(
                f"record_logits.store {self.store}: shards {', '.join(shard_name(i) for i in missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''} lack recorded samples (between {lo} and {hi}): this run "
                "did not record from its first step (record_logits was added on a resume, or pieces were "
                f"removed from {self.pending}); record again with a new record_logits.store"
            )

    def _assemble(self, index: int, pieces: list) -> bool:
        """Write shard ``index`` from ``pieces`` (``(gen, first, count, path)``; per sample the
        latest generation's), then delete them. False if a sample has no piece."""
        first, count = self.ranges[index]
        return assemble_shard(self.store, index, first, count, pieces, lambda first, samples: encode_shard(
            first, samples, self.seq_length, self.vocab_size, self.logprob_dtype, self.kind, self.draws,
            compression=self.compression, tail_temperatures=self.tail_temperatures,
            draw_temperature=self.draw_temperature))
