"""The recorder's staging pieces: the targets of consecutive samples of one shard, as a run records
them, and the assembly of a shard from them.

* ``pending/piece-FFFFFFFFFFFF-NNNNNN-gGGGGGG.bin`` — the targets of ``N`` consecutive samples
  from ``F`` on, recorded by process generation ``G``: a staging file (numpy ``.npz``, float64
  log-probs and residuals as the selection computed them), so that a shard is encoded once, from
  the exact values, as ``precompute-logits`` encodes it (any ``logprob_dtype``, quantised or
  compressed). Pieces cost ~16 B per kept id (int64 id, float64 log-prob) and are deleted once
  their shard is written.
* :func:`assemble_shard` writes a shard from its pieces (for each sample, the piece of the latest
  generation), atomically, then deletes them: a piece or shard is complete or absent, and a shard
  is written once, from complete data. When a shard is ready is the recorder's decision
  (``megadistill.store.recorder``).
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from megadistill.store import writer
from megadistill.store.encode import SampleTargets
from megadistill.store.format import StoreError, shard_name

PENDING = "pending"
_PIECE = re.compile(r"^piece-(\d{12})-(\d{6})-g(\d{6})\.bin$")


def piece_name(first: int, count: int, generation: int) -> str:
    """File name of a piece: ``count`` samples from global index ``first``, by ``generation``."""
    return f"piece-{first:012d}-{count:06d}-g{generation:06d}.bin"


def list_pieces(pending: Path) -> list[tuple[int, int, int, Path]]:
    """``[(first, count, generation, path)]`` of the complete pieces in ``pending`` (a writer's
    temporary files do not match the name pattern)."""
    out = []
    if pending.is_dir():
        for p in pending.iterdir():
            m = _PIECE.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), p))
    return sorted(out)


def encode_piece(first: int, samples: list[SampleTargets]) -> bytes:
    """A piece's bytes: ``samples`` (global indices ``first`` on) without any lossy encoding.
    Arrays: ``hashes[n, 16]`` uint8, ``counts[n, s]``, ``ids[E]`` (E = Σ counts over the piece, flat,
    position-major as in ``SampleTargets``), ``entry_offsets[n + 1]``; top-p-k: ``residual[n, s]``,
    ``logprobs[E]`` float64 and, with tempered tails, ``tails[n, s, T]`` float64; RS-KD: ``draws[E]``."""
    import io

    rskd = samples[0].draws is not None
    entries = [len(t.ids) for t in samples]
    arrays = {
        "first": np.asarray([first], dtype=np.int64),
        "hashes": np.frombuffer(b"".join(t.hash for t in samples), dtype=np.uint8).reshape(len(samples), -1),
        "counts": np.stack([np.asarray(t.counts, dtype=np.int64) for t in samples]),
        "ids": np.concatenate([np.asarray(t.ids, dtype=np.int64) for t in samples]),
        "entry_offsets": np.concatenate([[0], np.cumsum(entries)]).astype(np.int64),
    }
    if rskd:
        arrays["draws"] = np.concatenate([np.asarray(t.draws, dtype=np.int64) for t in samples])
    else:
        arrays["residual"] = np.stack([np.asarray(t.residual, dtype=np.float64) for t in samples])
        arrays["logprobs"] = np.concatenate([np.asarray(t.logprobs, dtype=np.float64) for t in samples])
        if samples[0].tails is not None:
            arrays["tails"] = np.stack([np.asarray(t.tails, dtype=np.float64) for t in samples])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_piece(data: bytes, name: str) -> tuple[int, list[SampleTargets]]:
    """Inverse of :func:`encode_piece`: ``(first, samples)``. A ``StoreError`` names an unreadable piece."""
    import io

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        first, off = int(a["first"][0]), a["entry_offsets"]
        samples = []
        for j in range(len(a["counts"])):
            e = slice(int(off[j]), int(off[j + 1]))
            if "draws" in a:
                samples.append(SampleTargets(a["hashes"][j].tobytes(), a["counts"][j], None, a["ids"][e], None,
                                             draws=a["draws"][e]))
            else:
                samples.append(SampleTargets(a["hashes"][j].tobytes(), a["counts"][j], a["residual"][j], a["ids"][e],
                                             a["logprobs"][e], tails=a["tails"][j] if "tails" in a else None))
    except (OSError, ValueError, KeyError, IndexError, EOFError, NotImplementedError, zipfile.BadZipFile) as e:
        # zipfile checks each member's CRC-32 as it is read: damage surfaces here, by content.
        raise StoreError(f"piece {name} is unreadable or damaged ({type(e).__name__}: {e})") from e
    return first, samples


def assemble_shard(store: Path, index: int, first: int, count: int, pieces: list,
                   encode: Callable[[int, list[SampleTargets]], bytes]) -> bool:
    """Write shard ``index`` of ``store`` (samples ``first .. first + count - 1``) from ``pieces``
    (``(gen, first, count, path)``; per sample the latest generation's), encoded by
    ``encode(first, samples)``, then delete the pieces. False if a sample has no piece."""
    pending = store / PENDING
    target = store / shard_name(index)
    if not target.is_file():
        chosen: dict[int, SampleTargets] = {}
        for gen, a, n, path in sorted(pieces):
            got, samples = decode_piece(path.read_bytes(), f"{pending}/{path.name}")
            if (got, len(samples)) != (a, n):
                raise StoreError(f"record_logits.store {store}: piece {path.name} holds samples "
                                 f"{got}..+{len(samples)}, its name says {a}..+{n}")
            for k, sample in enumerate(samples):
                chosen[a + k] = sample
        if any(i not in chosen for i in range(first, first + count)):
            return False
        writer.write_atomic(target, encode(first, [chosen[i] for i in range(first, first + count)]))
    for _, _, _, path in pieces:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return True
