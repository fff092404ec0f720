import os

# Import Megatron-core once in the pytest parent: forked ranks then start in well under a second.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib  # noqa: E402
import json  # noqa: E402
from typing import Iterator  # noqa: E402

import megatron.core.parallel_state  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
import pytest  # noqa: E402
from tiny_runs import TEACHER, Corpus, MixedCorpus, run_training, tiny_run  # noqa: E402

from megadistill.config import TrainingConfig  # noqa: E402
from megadistill.testing import run_distributed  # noqa: E402

# Fixtures more than one test directory uses. A directory's own shared fixtures are in its
# conftest.py; the plain helpers (run configs, launching a run, reading metrics) in tiny_runs.py.


# --------------------------------------------------------------------------- GPU machines
#
# Tests marked ``gpu`` (``@pytest.mark.gpu``, or ``gpu(devices=2)``) need that many CUDA devices and
# skip, with the reason, without them. They are also the only tests that see a GPU: on a machine
# with one, the session hides CUDA before the first test (megadistill.testing.hide_cuda), so every
# other test takes the CPU/gloo path it takes in CI. Its forked ranks would hide CUDA anyway; what
# the session adds is the processes tests start (``megadistill train``, torchrun, examples): they
# inherit CUDA_VISIBLE_DEVICES="" and DS_ACCELERATOR=cpu, instead of finding the GPU, choosing nccl,
# and putting two ranks on one device. GPU tests run their work in processes of their own, started
# with the ``gpu_env`` fixture's environment (the one pytest started with).

_GPU_ENV = dict(os.environ)
_GPUS = 0
_NO_GPU_REASON = ""


def _cuda_devices() -> tuple[int, str]:
    """(CUDA devices this machine offers, why none when 0). Asked in a child process: the pytest
    parent must not initialise CUDA, or the ranks it forks could not hide it cleanly."""
    import subprocess
    import sys

    import torch

    if torch.version.cuda is None:
        return 0, f"needs a CUDA GPU: torch {torch.__version__} is a CPU build"
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        n = int(r.stdout.split()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        n = 0
    return n, "" if n else "needs a CUDA GPU: torch.cuda.is_available() is False here"


def pytest_configure(config):
    global _GPUS, _NO_GPU_REASON
    config.addinivalue_line(
        "markers", "gpu(devices=1): needs CUDA GPUs (skipped with the reason without them); the only tests that see them"
    )
    _GPUS, _NO_GPU_REASON = _cuda_devices()
    if _GPUS:
        from megadistill.testing import hide_cuda

        hide_cuda()


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is None:
            continue
        need = mark.kwargs.get("devices", 1)
        if _GPUS == 0:
            item.add_marker(pytest.mark.skip(reason=_NO_GPU_REASON))
        elif _GPUS < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPUs, this machine has {_GPUS}"))


@pytest.fixture
def gpu_env() -> dict:
    """The environment pytest started with (GPUs visible): for the processes a ``gpu`` test starts."""
    return dict(_GPU_ENV)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """60,000 characters of the embedded corpus in one text file, preprocessed once per module
    with a 512-piece tokenizer."""
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(embedded_corpus_text()[:60_000])
    r = preprocess([str(root / "a.txt")], root / "data" / "corpus", vocab_size=512, progress=False)
    return Corpus(str(r.prefix), str(r.tokenizer_model))


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> MixedCorpus:
    """Two text files and a JSONL file cut from the first 120,000 characters of the embedded
    corpus, and those preprocessed once per module with a 512-piece tokenizer."""
    from megadistill.data.corpus import embedded_corpus_text
    from megadistill.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("mixed-corpus")
    text = embedded_corpus_text()[:120_000]
    parts = text.split("\n\n")
    (root / "a.txt").write_text("\n\n".join(parts[: len(parts) // 3]))
    (root / "b.txt").write_text("\n\n".join(parts[len(parts) // 3 : 2 * len(parts) // 3]))
    with open(root / "c.jsonl", "w") as f:
        for p in parts[2 * len(parts) // 3 :]:
            if p.strip():
                f.write(json.dumps({"text": p}) + "\n")
    inputs = [str(root / n) for n in ("a.txt", "b.txt", "c.jsonl")]
    result = preprocess(inputs, root / "data" / "corpus", vocab_size=512, progress=False)
    return MixedCorpus(inputs, str(result.prefix), str(result.tokenizer_model))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, mixed_corpus):
    """``TEACHER`` trained 15 steps on ``mixed_corpus``: (its output directory, the run's result);
    the checkpoint is in ``teacher_run[0] / "checkpoints"``."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = tiny_run(out, mixed_corpus, model=TEACHER, training=TrainingConfig(train_steps=15, eval_interval=15, eval_steps=1))
    result = run_distributed(run_training, 1, cfg)[0]
    return out, result


@pytest.fixture(scope="module")
def corpus_teacher_ckpt(tmp_path_factory, corpus) -> str:
    """``TEACHER`` trained 3 steps on ``corpus``: its checkpoint directory (an online teacher for
    runs over the same corpus)."""
    out = tmp_path_factory.mktemp("corpus-teacher")
    run_distributed(run_training, 1, tiny_run(out, corpus, model=TEACHER, training=TrainingConfig(
        train_steps=3, eval_interval=3, eval_steps=1)))
    return str(out / "checkpoints")


# --------------------------------------------------------------------------- a run killed midway
#
# Precompute and scoring resume from the shards/parts a killed run left. To kill a run after ``n``
# of them, the tests wrap the function every rank calls once at the start of each shard/part (it
# builds that unit's micro-batches), so that its ``n + 1``-th call raises: every rank stops after
# finishing ``n`` units -- writers and the ranks that only take part in the collectives alike, as a
# job killed there would. Patched in the pytest parent for the ``with`` block, so the ranks
# ``run_distributed`` forks inside it inherit it and a resumed run after it is not stopped.


@contextlib.contextmanager
def _stopping_after(module, name: str, n: int, unit: str) -> Iterator[None]:
    real, calls = getattr(module, name), [0]  # the count is per forked rank (each has its copy)

    def counted(*args, **kwargs):
        if calls[0] >= n:
            raise RuntimeError(f"stopped after {n} {unit}(s) (killed by the test)")
        calls[0] += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, counted)
        yield


@pytest.fixture
def stop_precompute_after_shards():
    """``with stop_precompute_after_shards(n):`` each rank of a ``precompute`` started in the
    block raises ``RuntimeError("stopped after n shard(s) ...")`` once it has done ``n`` of its
    shards."""
    from megadistill.store import precompute

    return lambda n: _stopping_after(precompute, "_micro_batches", n, "shard")


@pytest.fixture
def stop_scoring_after_parts():
    """``with stop_scoring_after_parts(n):`` each rank of a ``score_data`` started in the block
    raises ``RuntimeError("stopped after n part(s) ...")`` once it has done ``n`` of its parts."""
    from megadistill import sampler

    return lambda n: _stopping_after(sampler, "micro_batches", n, "part")
