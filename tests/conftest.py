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
