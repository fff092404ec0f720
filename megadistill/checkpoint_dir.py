"""Checkpoint directories, whatever the backend: naming, atomic commit, the completion marker
and checksums.

Layout under a checkpoint root::

    root/step_00000300/          a complete checkpoint
        COMPLETE                 written last, before the rename (JSON: step, the caller's run
                                 record, and the size and sha256 of every other file)
        ...                      the backend's own files
    root/step_00000400.tmp/      a save in progress, or one that was killed: never loaded

:func:`commit` runs a backend's writer into ``step_XXXXXXXX.tmp``; after every rank finished
(barrier), the ranks checksum the files between them, rank 0 writes the ``COMPLETE`` marker,
renames the directory and fsyncs. A save killed before the rename leaves only the ``.tmp``
directory, which :func:`latest_checkpoint` ignores and the next save of that step removes. The
root must be on a file system every rank sees.

Integrity: :func:`verify` (collective) checks a checkpoint against its marker before a backend
reads it -- no file missing or added, every size and sha256 as saved, the marker's own checksum
-- and raises :class:`CorruptCheckpointError` naming each bad file on every rank.
:func:`latest_verified_checkpoint` skips corrupt checkpoints with a warning and returns the
newest intact one. Hashing is split over the ranks (largest files first, each to the rank with
the fewest bytes so far), both at save and at load. A checkpoint written before checksums
existed has none to check: it is loaded with a warning.

sha256 rather than crc32 or blake2b: with the SHA extensions of current x86 CPUs it streams at
about 1 GB/s per core, faster than blake2b here and within a factor of 2-3 of zlib.crc32, whose 32
bits let one corruption in 4 billion through; and anyone can check a file by hand with
``sha256sum``.

One module despite its length: the ``COMPLETE`` marker is one protocol -- :func:`commit` writes it
with every file's checksum, :func:`verify` and the resume choice read it back -- and its naming,
commit and verification halves share the marker's keys and the ranks' split of the hashing.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch.distributed as dist

from megadistill.collective import on_every_rank, on_rank0, rank_world
from megadistill.processes import children_die_with_this_process

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKSUM = "sha256"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Marker keys owned by this module (not part of the caller's marker).
_INTEGRITY = "integrity"  # {"algorithm": "sha256", "files": {relative path: [size, hex digest]}}
_MARKER_CHECKSUM = "marker_sha256"  # of the rest of the marker, canonically serialised
_CHUNK = 1 << 20  # bytes read at a time: files are streamed, never held in memory


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files are not the ones its save wrote; ``problems`` name each file."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = Path(path)
        self.problems = list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        return (
            f"checkpoint {self.path} is corrupt:\n  {_listed(self.problems)}\nRestore it from a copy, or "
            "resume from an earlier checkpoint (checkpoint.resume: auto skips corrupt ones, or give one's path)"
        )

    def __reduce__(self):  # rebuilt from its arguments when sent between ranks
        return type(self), (str(self.path), self.problems)


class NoIntactCheckpointError(CorruptCheckpointError):
    """Every complete checkpoint under a root is corrupt (``path`` is the root)."""

    def _message(self) -> str:
        return (
            f"every complete checkpoint under {self.path} is corrupt:\n  {_listed(self.problems)}\n"
            "Restore one from a copy, or start over with checkpoint.resume: none"
        )


def _listed(problems: list[str], limit: int = 20) -> str:
    return "\n  ".join(problems[:limit]) + (f"\n  ... ({len(problems) - limit} more)" if len(problems) > limit else "")


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``root/step_{step:08d}``: where step ``step`` is saved."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(root) / f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    """True if ``path`` is a checkpoint directory whose save finished (it holds the marker)."""
    path = Path(path)
    return _STEP_DIR.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def _complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match is not None and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest *complete* checkpoint under ``root`` (highest step), or None.

    ``*.tmp`` directories (saves in progress or killed), directories without the completion
    marker and anything not named ``step_<digits>`` are ignored. Its files are not checked: to
    resume, use :func:`latest_verified_checkpoint`.
    """
    found = _complete_checkpoints(Path(root))
    return found[0] if found else None


def latest_verified_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` whose files pass :func:`verify`, or None if
    there is no complete checkpoint at all.

    Collective (rank 0 lists the root, every rank verifies its share, all agree). A corrupt
    checkpoint is skipped with a warning naming its bad files; if every one is corrupt,
    :class:`NoIntactCheckpointError` is raised rather than starting over silently.
    """
    root = Path(root)
    skipped: list[str] = []
    for path in on_rank0(lambda: _complete_checkpoints(root)):
        try:
            verify(path)
        except CorruptCheckpointError as e:
            _warn("skipping corrupt checkpoint: %s", e)
            skipped += [f"{path.name}/{problem}" for problem in e.problems]
            continue
        if skipped:
            _warn("resuming from %s, the newest intact checkpoint (newer ones are corrupt, see above)", path)
        return path
    if skipped:
        raise NoIntactCheckpointError(root, skipped)
    return None


def _finish_interrupted_swaps(root: Path) -> None:
    """Complete or undo a re-save of a step that was killed between its two renames
    (``step_N`` -> ``step_N.old``, ``step_N.tmp`` -> ``step_N``), which leaves no ``step_N``: the
    new copy wins if its marker was written (it was complete before the swap began), else the old
    copy is put back. A leftover ``.old`` next to a ``step_N`` is the replaced copy: removed."""
    if not root.is_dir():
        return
    for old in sorted(root.glob("step_*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if not _STEP_DIR.match(final.name) or not old.is_dir():
            continue
        if not final.exists():
            tmp = final.with_name(final.name + ".tmp")
            if (tmp / COMPLETE_MARKER).is_file():
                os.replace(tmp, final)
            else:
                os.replace(old, final)
                logger.warning("restored %s from an interrupted re-save (%s)", final, old.name)
                continue
            logger.warning("completed an interrupted re-save of %s", final)
        shutil.rmtree(old)
    fsync_dir(root)


def checkpoint_to_resume(root: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint ``checkpoint.resume`` names, verified. Collective.

    ``"auto"``: :func:`latest_verified_checkpoint` of ``root``; ``"none"``: None; a path: that
    checkpoint, refused with :class:`CorruptCheckpointError` naming its bad files if it is not
    intact. A path that is not a complete checkpoint is returned unverified, for the caller to
    refuse with its own message.
    """
    if resume == "none":
        return None
    if resume == "auto":
        on_rank0(lambda: _finish_interrupted_swaps(Path(root)))
        return latest_verified_checkpoint(root)
    path = Path(resume)
    if on_rank0(lambda: is_complete(path)):
        verify(path)
    return path


def read_marker(path: str | Path) -> dict:
    """The caller's part of a complete checkpoint's marker (``step``, ``layout``, run meta).

    Raises ``FileNotFoundError`` without a marker and :class:`CorruptCheckpointError` for one
    that is not intact. (Only the marker is read: :func:`verify` checks the other files.)
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete megadistill checkpoint (no {COMPLETE_MARKER} marker: an "
            "interrupted save?)"
        )
    return _callers_part(_parse_marker(path))


def recorded_files(path: str | Path) -> Optional[dict]:
    """The table of files the ``COMPLETE`` marker of ``path`` records (relative path -> [size,
    sha256]), or None where there is no marker or it records no checksums. The marker is looked
    for whatever the directory is called."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        return None
    return (_parse_marker(path).get(_INTEGRITY) or {}).get("files") or None


SUPERSEDED = re.compile(r"^superseded-\d{8}T\d{6}Z\+*$")
"""Names of the directories :func:`move_aside` creates."""


def move_aside(directory: str | Path, paths: Iterable[Path]) -> Path:
    """Move ``paths`` (those that exist) into a new ``directory/superseded-<UTC time>/`` (a ``+``
    added until the name is new) and return it: what a command that starts afresh over an earlier
    run's or conversion's files (``--overwrite``) does with them. Nothing is deleted."""
    aside = Path(directory) / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    while True:
        try:
            aside.mkdir(parents=True)
            break
        except FileExistsError:
            aside = aside.with_name(aside.name + "+")
    for p in paths:
        if p.exists() or p.is_symlink():
            os.replace(p, aside / p.name)
    return aside


def commit(root: str | Path, step: int, write: Callable[[Path], None], marker: dict) -> Path:
    """Save step ``step`` atomically: ``write(tmp_dir)`` on every rank, then the marker and rename.

    Collective. ``marker`` (JSON-serialisable, rank 0's copy is written) is stored in the
    ``COMPLETE`` file together with ``step`` and the size and checksum of every file ``write``
    left in the directory (hashed by all ranks, each its share). Processes forked while
    ``write`` runs die with this one (``megadistill.processes.children_die_with_this_process``). Re-saving an
    existing step replaces it only after the new copy is complete. An error on any rank, in any
    phase, is raised on every rank (none is left waiting) and leaves no complete checkpoint
    behind. Returns the final directory.
    """
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    with on_every_rank(f"preparing checkpoint directory {tmp}"):
        if rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left behind by a killed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
    with on_every_rank(f"writing checkpoint {tmp}"), children_die_with_this_process():
        write(tmp)
    files = _checksum_files(tmp)  # after every rank's files are on disk
    with on_every_rank(f"committing checkpoint {final}"):
        if rank == 0:
            _write_synced(tmp / COMPLETE_MARKER, _marker_text({**marker, "step": step}, files))
            fsync_dir(tmp)
            if final.exists():  # re-saving a step: swap the old copy out before the rename
                old = final.with_name(final.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
    return final


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------


def verify(path: str | Path) -> dict:
    """Check the checkpoint ``path`` against its marker; returns the caller's marker.

    Collective when a process group is initialised (rank 0 reads the marker and lists the
    directory, every rank hashes its share of the files, all agree), local otherwise. Raises
    on every rank alike: ``FileNotFoundError`` for a missing directory or marker,
    :class:`CorruptCheckpointError` naming every file that is missing, added, of another size
    or content, and for a marker that is not intact. A checkpoint written before checksums
    existed passes with a warning. Verifying the same unchanged checkpoint again in this process
    (the driver's resume decision, then the backend's load) is free.
    """
    path = Path(path)
    marker, listing, known = on_rank0(lambda: _read_for_verify(path))
    if not known:
        recorded = (marker.get(_INTEGRITY) or {}).get("files")
        if recorded is None:
            _warn("checkpoint %s was written before checkpoints recorded checksums: its files are not verified", path)
        else:
            _check_files(path, recorded, listing)
        if rank_world()[0] == 0:
            _VERIFIED[_cache_key(path)] = _marker_digest(marker), listing
    return _callers_part(marker)


def _check_files(path: Path, recorded: dict[str, list], listing: dict[str, int]) -> None:
    """Collective: raise CorruptCheckpointError on every rank if any rank finds a problem."""
    problems = _listing_problems(recorded, listing)  # the same on every rank
    intact_size = {name: recorded[name][0] for name in recorded if listing.get(name) == recorded[name][0]}
    rank, world = rank_world()
    problems += _content_problems(path, recorded, _split(intact_size, world)[rank])
    problems = sorted({p for rank_problems in _gather(problems) for p in rank_problems})
    if problems:
        raise CorruptCheckpointError(path, problems)


# Rank 0's record of the checkpoints verified in this process: key -> (marker digest, listing).
_VERIFIED: dict[str, tuple[str, dict[str, int]]] = {}


def _cache_key(path: Path) -> str:
    return str(path.resolve())


def _read_for_verify(path: Path) -> tuple[dict, dict[str, int], bool]:
    """Rank 0: (the parsed marker, the directory's files and sizes, already verified unchanged)."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete megadistill checkpoint (no {COMPLETE_MARKER} marker: an "
            "interrupted save?); latest_verified_checkpoint(root) finds the newest intact one"
        )
    marker = _parse_marker(path)
    listing = _list_files(path)
    return marker, listing, _VERIFIED.get(_cache_key(path)) == (_marker_digest(marker), listing)


def _parse_marker(path: Path) -> dict:
    """The whole marker of checkpoint ``path``, its own checksum checked (when it has one)."""
    file = path / COMPLETE_MARKER
    try:
        marker = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(path, [f"{COMPLETE_MARKER}: not valid JSON ({e})"]) from None
    if not isinstance(marker, dict):
        raise CorruptCheckpointError(path, [f"{COMPLETE_MARKER}: not a JSON object"])
    saved = marker.get(_MARKER_CHECKSUM)
    if saved is not None and saved != _marker_digest(marker):
        raise CorruptCheckpointError(path, [f"{COMPLETE_MARKER}: its content differs from its own checksum"])
    return marker


def _callers_part(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k not in (_INTEGRITY, _MARKER_CHECKSUM)}


def _marker_digest(marker: dict) -> str:
    """sha256 of the marker without its own checksum, serialised canonically."""
    body = {k: v for k, v in marker.items() if k != _MARKER_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _marker_text(marker: dict, files: dict[str, list]) -> str:
    # Through JSON first: the checksum is of what a reader parses (keys as strings, say).
    full = json.loads(json.dumps({**marker, _INTEGRITY: {"algorithm": CHECKSUM, "files": files}}))
    return json.dumps({**full, _MARKER_CHECKSUM: _marker_digest(full)}) + "\n"


def _list_files(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` but the marker: relative POSIX path -> size, sorted."""
    found = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            file = Path(dirpath) / name
            relative = file.relative_to(directory).as_posix()
            if relative != COMPLETE_MARKER:
                found[relative] = file.stat().st_size
    return dict(sorted(found.items()))


def _hash_file(file: Path) -> tuple[int, str]:
    """(size, hex sha256) of ``file``, streamed ``_CHUNK`` bytes at a time."""
    digest = hashlib.new(CHECKSUM)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _split(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files split over ``world`` ranks for hashing: largest first, each to the rank with
    the fewest bytes so far. A pure function of its arguments, so every rank computes the same."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [(0, r) for r in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        total, r = heapq.heappop(load)
        shares[r].append(name)
        heapq.heappush(load, (total + sizes[name], r))
    return shares


def _checksum_files(directory: Path) -> dict[str, list]:
    """Collective: {file: [size, digest]} of everything in ``directory``, each rank hashing its share."""
    sizes = on_rank0(lambda: _list_files(directory))
    rank, world = rank_world()
    with on_every_rank(f"checksumming checkpoint {directory}"):
        mine = {name: list(_hash_file(directory / name)) for name in _split(sizes, world)[rank]}
    files = {name: entry for share in _gather(mine) for name, entry in share.items()}
    return dict(sorted(files.items()))


def _listing_problems(recorded: dict[str, list], listing: dict[str, int]) -> list[str]:
    """What the directory listing alone shows: missing and added files, changed sizes."""
    problems = [f"{name}: missing" for name in recorded if name not in listing]
    problems += [f"{name}: not written by the save (added later?)" for name in listing if name not in recorded]
    problems += [
        f"{name}: {listing[name]} bytes, {recorded[name][0]} when saved (truncated or overwritten)"
        for name in recorded
        if name in listing and listing[name] != recorded[name][0]
    ]
    return problems


def _content_problems(path: Path, recorded: dict[str, list], names: list[str]) -> list[str]:
    """This rank's share: files whose content is not what was saved. Never raises (the others
    wait for this rank's answer)."""
    problems = []
    for name in names:
        try:
            size, digest = _hash_file(path / name)
        except OSError as e:
            problems.append(f"{name}: unreadable ({e.strerror or e})")
            continue
        if [size, digest] != recorded[name]:
            problems.append(f"{name}: content differs from the {CHECKSUM} recorded at save")
    return problems


# ---------------------------------------------------------------------------------------------
# Collective helpers (plain local calls without a process group)
# ---------------------------------------------------------------------------------------------


def _gather(obj: Any) -> list:
    rank, world = rank_world()
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _warn(message: str, *args: Any) -> None:
    if rank_world()[0] == 0:  # once, not once per rank
        logger.warning(message, *args)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; best effort where the file system
    cannot open or sync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
