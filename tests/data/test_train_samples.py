"""``data.train_samples``: Megatron's GPTDataset shuffles over all epochs, so over a corpus of
several epochs the sample order depends on how many samples the dataset is built for. Runs that
set the same ``train_samples`` read the same order whatever their length."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from megadistill.config import ConfigError, TrainingConfig, validate
from megadistill.testing import run_distributed
from tiny_runs import tiny_run


def _first_samples(cfg, n=24):
    from megadistill.data.datasets import prepare_data

    _, train_ds, _, _ = prepare_data(cfg)
    return np.stack([np.asarray(train_ds[i]["tokens"]) for i in range(n)])


def test_the_same_train_samples_give_one_sample_order_for_runs_of_any_length(tmp_path, mixed_corpus):
    short = tiny_run(tmp_path / "short", mixed_corpus, training=TrainingConfig(train_steps=10))
    long = replace(short, output_dir=str(tmp_path / "long"), training=TrainingConfig(train_steps=400))
    # 400 steps x 8 samples of 32 tokens are many epochs of this corpus, 10 steps one or two.
    a, b = run_distributed(_first_samples, 1, short)[0], run_distributed(_first_samples, 1, long)[0]
    assert not np.array_equal(a, b), "the default order should depend on the run's length here"
    pinned = 400 * 8
    a = run_distributed(_first_samples, 1, replace(short, data=replace(short.data, train_samples=pinned)))[0]
    b = run_distributed(_first_samples, 1, replace(long, data=replace(long.data, train_samples=pinned)))[0]
    np.testing.assert_array_equal(a, b)


def test_train_samples_must_cover_the_run(tmp_path, mixed_corpus):
    cfg = tiny_run(tmp_path / "r", mixed_corpus, training=TrainingConfig(train_steps=10))
    with pytest.raises(ConfigError, match="data.train_samples 79 is less than the 80"):
        validate(replace(cfg, data=replace(cfg.data, train_samples=79)))
    validate(replace(cfg, data=replace(cfg.data, train_samples=80)))


def test_data_seed_keeps_the_sample_order_while_the_weights_seed_changes(tmp_path, mixed_corpus):
    a_cfg = tiny_run(tmp_path / "a", mixed_corpus, training=TrainingConfig(train_steps=10, seed=1))
    b_cfg = replace(a_cfg, output_dir=str(tmp_path / "b"), training=TrainingConfig(train_steps=10, seed=2))
    a, b = run_distributed(_first_samples, 1, a_cfg)[0], run_distributed(_first_samples, 1, b_cfg)[0]
    assert not np.array_equal(a, b)
    a = run_distributed(_first_samples, 1, replace(a_cfg, data=replace(a_cfg.data, seed=7)))[0]
    b = run_distributed(_first_samples, 1, replace(b_cfg, data=replace(b_cfg.data, seed=7)))[0]
    np.testing.assert_array_equal(a, b)
