"""Every ``examples/*.yaml`` is a valid run, and the whole chain the examples describe (teachers, PD
online/offline/PD*, SALT, SALT_DS, baseline) runs at toy scale with the files as they are; only
sizes, step counts and paths are overridden."""

from __future__ import annotations

import re

import pytest
from tiny_runs import ROOT

from megadistill.config import load_config
from megadistill.testing import run_distributed

EXAMPLES = ROOT / "examples"
NAMES = ("teacher", "small_teacher", "baseline", "pd_online", "pd_offline", "pd_star", "salt", "salt_ds")


def test_the_example_set_is_complete():
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_example_is_a_valid_config(name):
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    assert cfg.name == name and cfg.output_dir == f"runs/examples/{name}"
    # As written, on one process and on two (DP 2) alike: the batch sizes divide either way.
    for world_size in (1, 2):
        load_config(EXAMPLES / f"{name}.yaml", world_size=world_size)


def test_salt_examples_use_a_teacher_smaller_than_the_student():
    for name in ("salt", "salt_ds"):
        cfg = load_config(EXAMPLES / f"{name}.yaml")
        small = load_config(EXAMPLES / "small_teacher.yaml")
        assert cfg.teacher.model.hidden_size == small.model.hidden_size < cfg.model.hidden_size
        assert cfg.teacher.model.num_layers == small.model.num_layers < cfg.model.num_layers
        assert cfg.kd.alpha.kind == "salt" and 0 < cfg.kd.alpha.n_kd < cfg.training.train_steps


def test_the_readme_maps_every_knob_to_a_key_that_exists():
    """The README's design-space table names YAML keys: each must be a real config key."""
    from megadistill.config import RunConfig, to_dict

    readme = (EXAMPLES.parent / "README.md").read_text()
    table = readme[readme.index("<!-- design-space table -->"):readme.index("<!-- end design-space table -->")]
    keys = set(re.findall(r"`((?:kd|teacher|optimizer|data_selection|record_logits|data)\.[a-z_.]+)`", table))
    assert len(keys) >= 15, keys

    def has(tree, dotted):
        for part in dotted.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    tree = to_dict(RunConfig())
    assert [k for k in keys if not has(tree, k)] == []


def _toy(name, tmp, corpus, extra=()):
    _, prefix, tok = corpus
    out = {n: str(tmp / n) for n in NAMES}
    overrides = [
        f"output_dir={out[name]}", f"data.data_prefix={prefix}", f"data.tokenizer_model={tok}",
        "data.seq_length=32", "data.micro_batch_size=4", "data.global_batch_size=8",
        "training.train_steps=4", "training.eval_interval=4", "training.eval_steps=1", "checkpoint.save_interval=4",
        "model.num_layers=2", "model.hidden_size=64",
    ]
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    if cfg.teacher.mode != "none":
        teacher = "small_teacher" if cfg.kd.alpha.kind == "salt" else "teacher"
        overrides += [f"teacher.checkpoint={out[teacher]}/checkpoints", "teacher.model.num_layers=2"]
        overrides += [f"teacher.model.hidden_size={48 if teacher == 'small_teacher' else 96}"]
        if cfg.teacher.store:
            overrides.append(f"teacher.store={tmp / 'store'}")
    if name == "teacher":
        overrides.append("model.hidden_size=96")
    if name == "small_teacher":
        overrides.append("model.hidden_size=48")
    if cfg.kd.alpha.kind == "salt":
        overrides.append("kd.alpha.n_kd=2")
    if cfg.data_selection.scores:
        overrides.append(f"data_selection.scores={tmp / 'scores'}")
    return load_config(EXAMPLES / f"{name}.yaml", overrides + list(extra))


def _train(cfg):
    from megadistill.train import run

    return run(cfg, progress=False).last_metrics


def _precompute(cfg):
    from megadistill.store.precompute import precompute

    precompute(cfg, progress=False)


def _score(cfg):
    from megadistill.salt.score import score_data

    score_data(cfg, progress=False)


def test_the_examples_run_end_to_end_at_toy_scale(tmp_path, mixed_corpus):
    from megadistill.preflight import preflight

    done = {}
    for name in ("teacher", "small_teacher", "baseline", "pd_online", "pd_star", "pd_offline", "salt", "salt_ds"):
        cfg = _toy(name, tmp_path, mixed_corpus)
        if name == "pd_offline":
            run_distributed(_precompute, 1, cfg)
        if name == "salt_ds":
            run_distributed(_score, 1, cfg)
        preflight(cfg)  # the files each example names exist once the steps before it ran
        done[name] = run_distributed(_train, 1, cfg)[0]
    for name in ("pd_online", "pd_star", "pd_offline", "salt", "salt_ds"):
        assert "kd loss" in _first_step(tmp_path / name), name
    assert done["salt"]["alpha"] == 0.0 and "kd loss" not in done["salt"]
    assert done["pd_star"]["alpha"] < 0.9  # WSD-α is decaying at the last step


def _first_step(out):
    from megadistill.metrics import read_metrics

    return read_metrics(out)[1]
