import pytest
from tiny_runs import TEACHER, run_training, tiny_run

from megadistill.config import OptimizerConfig, TrainingConfig
from megadistill.testing import run_distributed


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, corpus):
    """``TEACHER`` trained 40 steps on ``corpus``: its checkpoints directory. Trained far enough that
    top-p, not only top-k, decides how many ids a position keeps."""
    out = tmp_path_factory.mktemp("store-teacher")
    run_distributed(run_training, 1, tiny_run(out, corpus, model=TEACHER, optimizer=OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_fraction=0.1),
                                              training=TrainingConfig(train_steps=40, eval_interval=40, eval_steps=1)))
    return str(out / "checkpoints")
