"""Checkpoint integrity: every file of a checkpoint is checksummed at save and verified before a
backend reads it, so no corruption loads silently; read errors that still happen name the file; a
rank killed with SIGKILL during a save leaves no process behind.

Fault injection: one tiny Megatron save on 2 ranks, then each kind of file corrupted in turn (in a
copy) and verified file-level, without a model; plus end-to-end loads through the Megatron
backend. The DeepSpeed backend's files are covered in tests/deepspeed/test_ds_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoint_training import build_training, train_steps

from megadistill import _compat, checkpoint_dir
from megadistill.checkpoint_dir import COMPLETE_MARKER, CorruptCheckpointError, verify
from megadistill.megatron.checkpoint import load_checkpoint, save_checkpoint
from megadistill.testing import run_distributed

TESTS = Path(__file__).resolve().parent


def _save(root: str) -> str:
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    train_steps(ddp, optimizer, scheduler, [1])
    return str(save_checkpoint(root, 1, ddp, optimizer, scheduler))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A committed 2-rank checkpoint: .metadata, metadata.json and __<rank>_<i>.distcp, with
    megatron-core 0.16 also common.pt (0.16 writes two .distcp per rank, 0.19 one)."""
    return Path(run_distributed(_save, 2, str(tmp_path_factory.mktemp("saved")))[0])


def _copy(saved: Path, tmp: Path, label: str) -> Path:
    copy = tmp / label / saved.name
    shutil.copytree(saved, copy)
    return copy


# -- Corruptions: each keeps the file's name; most keep its size, which a size check alone misses.


def _overwrite_64_floats(file: Path) -> None:
    data = bytearray(file.read_bytes())
    start = len(data) // 2
    data[start : start + 256] = bytes(b ^ 0xFF for b in data[start : start + 256])
    file.write_bytes(data)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _garbage(file: Path) -> None:
    file.write_bytes(random.Random(file.name).randbytes(max(file.stat().st_size, 16)))


def _delete(file: Path) -> None:
    file.unlink()


def _edit_a_recorded_checksum(marker: Path) -> None:
    """Still valid JSON: only the marker's own checksum can tell."""
    text = marker.read_text()
    at = text.index('"files"')
    at = text.index('"', text.index("[", at) + 1) + 1  # first character of the first digest
    marker.write_text(text[:at] + ("0" if text[at] != "0" else "1") + text[at + 1 :])


DATA_CORRUPTIONS = [_overwrite_64_floats, _truncate, _empty, _garbage, _delete]
MARKER_CORRUPTIONS = [_truncate, _empty, _garbage, _overwrite_64_floats, _edit_a_recorded_checksum]


def test_the_marker_records_every_file_with_its_sha256(saved):
    import hashlib

    marker = json.loads((saved / COMPLETE_MARKER).read_text())
    files = marker["integrity"]["files"]
    on_disk = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    assert sorted(files) == on_disk
    assert {".metadata", "metadata.json", "__0_0.distcp", "__1_0.distcp"} <= set(files)
    version = _compat.installed_version()
    assert marker["megatron_core"] == version  # the writer's version, readable without megatron-core
    assert ("common.pt" in files) == _compat.writes_common_pt(version)
    for name, (size, digest) in files.items():  # what `sha256sum` prints
        assert [size, digest] == [(saved / name).stat().st_size, hashlib.sha256((saved / name).read_bytes()).hexdigest()]
    assert marker["integrity"]["algorithm"] == "sha256"
    assert verify(saved)["step"] == 1  # intact: passes, and returns the caller's marker


def test_every_kind_of_corrupted_file_is_detected(saved, tmp_path):
    names = sorted(json.loads((saved / COMPLETE_MARKER).read_text())["integrity"]["files"])
    cases = [(name, how) for name in names for how in DATA_CORRUPTIONS]
    cases += [(COMPLETE_MARKER, how) for how in MARKER_CORRUPTIONS]
    silent, vague = [], []
    for i, (name, corrupt) in enumerate(cases):
        copy = _copy(saved, tmp_path, str(i))
        corrupt(copy / name)
        try:
            verify(copy)
        except CorruptCheckpointError as e:
            if name not in str(e) or str(copy) not in str(e):
                vague.append((name, corrupt.__name__, str(e)))
        else:
            silent.append((name, corrupt.__name__))
    assert len(names) >= 4 and len(cases) == 5 * len(names) + 5  # 0.16: 6 files (and common.pt); 0.19: 4
    assert silent == [], f"loaded silently: {silent}"
    assert vague == [], f"errors that do not name the file: {vague}"

    added = _copy(saved, tmp_path, "added")
    (added / "notes.txt").write_text("not part of the save")
    with pytest.raises(CorruptCheckpointError, match=r"notes.txt: not written by the save"):
        verify(added)


def _verify_on_two_ranks(path: str):
    """verify() with this rank's hashed files recorded."""
    import torch.distributed as dist

    hashed = []
    real = checkpoint_dir._hash_file

    def recording(file):
        hashed.append(Path(file).name)
        return real(file)

    checkpoint_dir._hash_file = recording
    try:
        verify(path)
        error = None
    except CorruptCheckpointError as e:
        error = str(e)
    finally:
        checkpoint_dir._hash_file = real
    return dist.get_rank(), sorted(hashed), error


def test_verification_is_split_over_the_ranks_and_agreed(saved, tmp_path):
    files = json.loads((saved / COMPLETE_MARKER).read_text())["integrity"]["files"]
    shares = checkpoint_dir._split({name: size for name, (size, _) in files.items()}, 2)
    copy = _copy(saved, tmp_path, "split")
    victim = shares[1][0]  # a file only rank 1 hashes
    _overwrite_64_floats(copy / victim)
    results = run_distributed(_verify_on_two_ranks, 2, str(copy))
    hashed = [h for _, h, _ in results]
    assert hashed == [sorted(shares[0]), sorted(shares[1])]
    assert not set(hashed[0]) & set(hashed[1]) and set(hashed[0]) | set(hashed[1]) == set(files)
    assert abs(sum(files[n][0] for n in hashed[0]) - sum(files[n][0] for n in hashed[1])) <= max(s for s, _ in files.values())
    # Rank 0 never read the bad file, and raises all the same, with rank 1's finding.
    for _, _, error in results:
        assert error is not None and f"{victim}: content differs from the sha256 recorded at save" in error


def _load_error(path: str) -> str:
    ddp, optimizer, scheduler = build_training(dropout=0.0)
    try:
        load_checkpoint(path, ddp, optimizer, scheduler)
    except CorruptCheckpointError as e:
        return f"CorruptCheckpointError: {e}"
    return "loaded"


def test_overwritten_tensor_data_is_refused_by_the_megatron_load(saved, tmp_path):
    copy = _copy(saved, tmp_path, "flipped")
    _overwrite_64_floats(copy / "__0_0.distcp")
    for message in run_distributed(_load_error, 2, str(copy)):
        assert message.startswith(f"CorruptCheckpointError: checkpoint {copy} is corrupt")
        assert "__0_0.distcp: content differs from the sha256 recorded at save" in message


def _legacy(copy: Path) -> Path:
    """The checkpoint as written before checksums existed: a marker without them."""
    marker = json.loads((copy / COMPLETE_MARKER).read_text())
    marker.pop("integrity")
    marker.pop("marker_sha256")
    (copy / COMPLETE_MARKER).write_text(json.dumps(marker))
    return copy


def _legacy_load_errors(paths: dict) -> dict:
    errors = {}
    for label, path in paths.items():
        ddp, optimizer, scheduler = build_training(dropout=0.0)
        try:
            load_checkpoint(path, ddp, optimizer, scheduler)
            errors[label] = None
        except Exception as e:
            chained = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
            errors[label] = (type(e).__name__, str(e), str(chained))
    return errors


def test_unverifiable_checkpoints_fail_naming_the_file(saved, tmp_path):
    """A checkpoint without checksums loads with a warning; what megatron-core or torch then
    raise names the file, and never passes on torch's advice to load with weights_only=False."""
    last_distcp = sorted(p.name for p in saved.glob("__*.distcp"))[-1]  # __1_0 (0.19) or __1_1 (0.16)
    cases = {".metadata": _garbage, "metadata.json": _empty, last_distcp: _truncate}
    if (saved / "common.pt").is_file():  # megatron-core 0.16
        cases["common.pt"] = _garbage
    else:  # 0.19: the common state is an object in rank 0's file
        cases["__0_0.distcp"] = _garbage
    paths = {}
    for name, corrupt in cases.items():
        copy = _legacy(_copy(saved, tmp_path, name.strip(".")))
        corrupt(copy / name)
        paths[name] = str(copy)
    paths["intact"] = str(_legacy(_copy(saved, tmp_path, "intact")))
    errors = run_distributed(_legacy_load_errors, 1, paths)[0]
    assert errors.pop("intact") is None  # unverified, but loads
    for name, (kind, message, chained) in errors.items():
        where = Path(paths[name]) / name if not name.endswith(".distcp") else Path(paths[name])
        assert kind == "ValueError" and "cannot read " in message and str(where) in message, (name, message)
        assert ("a corrupt file" if name.endswith(".distcp") else "corrupt or not a megadistill checkpoint") in message
        for advice in ("`weights_only` set to `False`", "weights_only=False"):  # torch's words
            assert advice not in message + chained, (name, message, chained)
    if "common.pt" in errors:
        assert "not a file torch.load reads safely" in errors["common.pt"][1]
    else:  # a file that does not exist is never named as the culprit
        assert "the common state ('common_state' in __*.distcp)" in errors["__0_0.distcp"][1]
        assert all("common.pt" not in message for _, message, _ in errors.values())


# -- kill -9 during a save ---------------------------------------------------------------------

_SAVER = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint_integrity import _save_forever
_save_forever(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def _save_forever(root: str, port: str, results_queue: str) -> None:
    """Run in a subprocess: save checkpoints of a ~50 MB model until killed."""
    from datetime import timedelta

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megadistill.testing import cpu_patches
    from megadistill.testing.models import tiny_gpt

    torch.set_num_threads(1)
    cpu_patches.apply()
    if results_queue == "megatron":  # as on a GPU machine, where the CPU layer is not applied
        filesystem_async._results_queue = None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    parallel_state.initialize_model_parallel()
    model = tiny_gpt(4, 512, 8, 1024, 16)
    print("ready", flush=True)
    for step in range(10_000):
        save_checkpoint(root, step, model, None)
        print("saved", step, flush=True)


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie is dead, waiting to be reaped
    except FileNotFoundError:
        return False


def _describe(pid: int) -> str:
    try:
        status = {k: v.strip() for k, v in (line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)}
        wchan = open(f"/proc/{pid}/wchan").read()
        cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:120]
        return f"pid {pid} (parent {status.get('PPid')}, {status.get('VmRSS')}, waiting in {wchan}): {cmd}"
    except FileNotFoundError:
        return f"pid {pid} (gone)"


def _waiting(pid: int) -> bool:
    """The process's main thread is blocked on a futex (the rank waiting for its writers)."""
    try:
        return open(f"/proc/{pid}/wchan").read().startswith("futex")
    except FileNotFoundError:
        return False


# The results queue megatron-core would create itself (a GPU machine), or the CPU layer's; the
# rank is killed as soon as its writers run, or once it waits for them (then, before the fix, the
# last writer to finish waits forever to wake it). megatron-core 0.19 forks no writers (it writes
# from threads): there the saver must start no process at all, and is killed mid-save.
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("results_queue, kill_when", [("megatron", "writing"), ("cpu-layer", "waiting")])
def test_kill_9_during_a_save_leaves_no_process_behind(tmp_path, results_queue, kill_when):
    from megadistill.testing.distributed import CPU_ONLY_ENV, free_port

    # A fresh interpreter: with the GPUs hidden from it, it runs on CPU/gloo on a GPU machine too.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **CPU_ONLY_ENV}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER.format(tests=str(TESTS)), str(tmp_path), str(free_port()), results_queue],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    seen: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        # Into the second save: whatever the first one started is running by then.
        assert proc.stdout.readline().strip() == "saved 0"
        seen |= _descendants(proc.pid)
        if _compat.forks_checkpoint_writers(_compat.installed_version()):
            deadline = time.time() + 120
            writers: set[int] = set()
            while time.time() < deadline:
                writers = _descendants(proc.pid) - seen  # megatron's writer processes, forked for each save
                if any(_alive(p) for p in writers) and (kill_when == "writing" or _waiting(proc.pid)):
                    break
                time.sleep(0.002)
            assert writers, "the saver forked no writer"
        else:  # 0.19 writes from threads: watched over a few saves, it starts no process to leave behind
            deadline = time.time() + 1.0
            writers = set()
            while time.time() < deadline:
                writers |= _descendants(proc.pid)
                time.sleep(0.002)
            assert writers == set(), [_describe(p) for p in writers]
        seen |= writers
        seen |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # mid-save: its writers are running
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.05)
        left = [_describe(p) for p in sorted(seen) if _alive(p)]
        assert left == [], "left behind by the killed saver:\n" + "\n".join(left)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in seen:  # our own test's leftovers, by pid
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

