"""Shared pieces of the logits-store tests (test_store.py, test_store_pp.py): the KD settings a
store is made with, an offline-KD run reading a store, and a store's files.

(The teacher checkpoint these runs read is the ``teacher_ckpt`` fixture in this directory's
conftest.py.)
"""

from __future__ import annotations

from pathlib import Path

from tiny_runs import TEACHER, tiny_run

from megadistill.config import KDConfig, RunConfig, TeacherConfig
from megadistill.schedules import AlphaSchedule


def kd_config(**kw) -> KDConfig:
    """The stores' truncation: top-p 0.3, top-k 24, ghost bucket; constant α 0.5."""
    return KDConfig(top_p=0.3, top_k=24, truncation="ghost", alpha=AlphaSchedule("constant", alpha_max=0.5), **kw)


def offline_run(out, corpus, ckpt, store, **kw) -> RunConfig:
    """``tiny_run`` distilling offline from ``store`` (made by ``TEACHER`` from ``ckpt``)."""
    return tiny_run(out, corpus, teacher=TeacherConfig(mode="offline", model=TEACHER, checkpoint=ckpt, store=str(store)),
                    kd=kd_config(), **kw)


def store_files(store) -> dict[str, bytes]:
    """Every file of the store directory: name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(store).iterdir())}
