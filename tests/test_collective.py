"""``megadistill.collective.on_rank0``: whatever a rank-0 section raises reaches every rank, at
once -- never one rank failing while the others wait in the broadcast (a hang until the process
group's timeout). On 2 forked gloo ranks, with a harness timeout well below the group's 120 s, so
a hang fails the test instead of stalling it.

Then the same through the commands that use it: ``precompute`` (logits store) and ``score_data``
(SALT_DS) with a rank-0 step that raises a plain ``RuntimeError`` -- before ``on_rank0``, their
own rank-0 helper broadcast only StoreError/ConfigError/OSError and the other ranks hung.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from megadistill.testing import run_distributed

HANG = 60  # seconds: a 2-rank CPU run of a failing section takes a second or two


class CustomError(Exception):
    """A project-unknown exception type (module level: it pickles, so it arrives as itself)."""


class UnpicklableError(Exception):
    """An exception that cannot be pickled (it holds a lock), so it cannot be broadcast as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


_ERRORS = {
    "key": lambda: KeyError("no such entry"),
    "custom": lambda: CustomError("rank 0 could not"),
    "unpicklable": lambda: UnpicklableError("holds a lock"),
}


def _section(which: str):
    """On each rank: a rank-0 section raising ``_ERRORS[which]``, then a healthy one (the ranks
    must still be in step). Returns ``(the error's type name, its message, the next result)``."""
    from megadistill.collective import on_rank0

    def fail():
        raise _ERRORS[which]()

    try:
        on_rank0(fail)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which checks it
        caught = (type(e).__name__, str(e))
    else:
        caught = None
    return caught, on_rank0(lambda: ["rank 0's", "result"])


def test_an_arbitrary_rank0_error_is_raised_on_every_rank():
    for which in ("key", "custom"):
        want = type(_ERRORS[which]()).__name__, str(_ERRORS[which]())
        assert run_distributed(_section, 2, which, timeout=HANG) == [(want, ["rank 0's", "result"])] * 2, which


def test_an_unpicklable_rank0_error_arrives_as_a_runtime_error_naming_it():
    got = run_distributed(_section, 2, "unpicklable", timeout=HANG)
    assert got == [(("RuntimeError", "UnpicklableError: holds a lock"), ["rank 0's", "result"])] * 2


def test_a_rank0_result_reaches_every_rank():
    def ok():
        from megadistill.collective import on_rank0, rank_world

        return on_rank0(lambda: {"from": rank_world()[0]})

    assert run_distributed(ok, 2, timeout=HANG) == [{"from": 0}, {"from": 0}]


# --------------------------------------------------------------------------- through the commands


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("collective-corpus")
    (root / "a.txt").write_text(embedded_corpus_text()[:30_000])
    r = preprocess([str(root / "a.txt")], root / "data" / "corpus", vocab_size=512, progress=False)
    return str(r.prefix), str(r.tokenizer_model)


def _cfg(out: Path, corpus):
    from megadistill.config import (
        DataConfig, DataSelectionConfig, KDConfig, ModelConfig, RunConfig, TeacherConfig, TrainingConfig,
    )

    prefix, tok = corpus
    tiny = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4)
    return RunConfig(
        name=out.name, output_dir=str(out), model=tiny,
        data=DataConfig(data_prefix=prefix, tokenizer_model=tok, seq_length=16, micro_batch_size=2, global_batch_size=4),
        training=TrainingConfig(train_steps=2, eval_interval=2, eval_steps=1),
        teacher=TeacherConfig(mode="offline", model=tiny, checkpoint=str(out / "teacher"), store=str(out / "store")),
        kd=KDConfig(top_p=0.9, top_k=8),
        data_selection=DataSelectionConfig(scores=str(out / "scores")),
    )


def _command(name: str, cfg):
    """Run command ``name`` on this rank; what it raised, as ``(type name, message)``."""
    if name == "precompute":
        from megadistill.store.precompute import precompute as command
    else:
        from megadistill.salt.score import score_data as command
    try:
        command(cfg, progress=False)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which checks it
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("name", ["precompute", "score_data"])
def test_a_command_whose_rank0_step_fails_raises_on_every_rank(tmp_path, small_corpus, monkeypatch, name):
    import megadistill.checkpoint_identity

    def broken(path):
        raise RuntimeError(f"rank 0 could not read {Path(path).name}")

    # Patched in the parent, so both forked ranks inherit it (only rank 0 calls it: its first
    # rank-0 section, before any teacher is built).
    monkeypatch.setattr(megadistill.checkpoint_identity, "resolve_teacher_checkpoint", broken)
    got = run_distributed(_command, 2, name, _cfg(tmp_path / "run", small_corpus), timeout=HANG)
    assert got == [("RuntimeError", "rank 0 could not read teacher")] * 2


def _rank1_waits_forever():
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(600)


def test_the_harness_timeout_turns_a_hang_into_a_failure():
    """What the tests above rely on to fail, not stall, if a rank hangs."""
    import time

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] of 2 still running after 2 s"):
        run_distributed(_rank1_waits_forever, 2, timeout=2)
    assert time.monotonic() - t0 < 30
