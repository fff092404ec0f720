"""Run configs: YAML + overrides into dataclasses, and invalid configs rejected with a clear message
naming the key, before any process group exists."""

from __future__ import annotations

import pytest
import yaml

from megadistill.config import ConfigError, RunConfig, config_from_dict, explain, load_config, validate

INVALID = [
    ({"modle": {}}, r"unknown key modle; did you mean model\?"),
    ({"kd": {"temprature": 2.0}}, r"unknown key kd.temprature; did you mean kd.temperature\?"),
    ({"training": {"train_steps": "ten"}}, r"training.train_steps: expected an integer, got 'ten'"),
    ({"parallel": {"sequence_parallel": "yes"}}, r"parallel.sequence_parallel: expected true or false, got 'yes'"),
    ({"optimizer": {"lr": "fast"}}, r"optimizer.lr: expected a number, got 'fast'"),
    ({"kd": {"temperature": 0}}, r"kd.temperature must be > 0, got 0.0"),
    ({"kd": {"temperature": -1.5}}, r"kd.temperature must be > 0, got -1.5"),
    ({"kd": {"jsd_beta": 2}}, r"kd.jsd_beta must be in \[0, 1\], got 2.0"),
    ({"kd": {"top_p": 0}}, r"kd.top_p must be in \(0, 1\], got 0.0"),
    ({"kd": {"loss": "mse", "top_k": 50}}, r"kd.loss='mse' compares logits and cannot use top_p/top_k"),
    ({"kd": {"loss": "kld"}}, r"kd.loss: unknown loss 'kld'"),
    ({"kd": {"alpha": {"kind": "stepwise"}}}, r"kd.alpha.kind: unknown schedule 'stepwise'"),
    ({"kd": {"alpha": {"alpha_max": 1.5}}}, r"kd.alpha.alpha_max must be in \[0, 1\], got 1.5"),
    ({"model": {"hidden_size": 190}}, r"model.hidden_size 190 is not divisible by num_attention_heads 4"),
    ({"model": {"num_attention_heads": 4}, "parallel": {"tensor_model_parallel_size": 8}, "_world": 8},
     r"model.num_attention_heads 4 is not divisible by parallel.tensor_model_parallel_size 8"),
    ({"model": {"num_layers": 3}, "parallel": {"pipeline_model_parallel_size": 2}, "_world": 2},
     r"model.num_layers 3 is not divisible by parallel.pipeline_model_parallel_size 2"),
    ({"data": {"global_batch_size": 10, "micro_batch_size": 4}},
     r"data.global_batch_size 10 is not divisible by data.micro_batch_size 4 x data-parallel size 1"),
    ({"data": {"global_batch_size": 16, "micro_batch_size": 4}, "_world": 3},
     r"data.global_batch_size 16 is not divisible by data.micro_batch_size 4 x data-parallel size 3"),
    ({"parallel": {"tensor_model_parallel_size": 2}, "_world": 3},
     r"world size 3 is not divisible by parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size = 2 x 1 = 2"),
    ({"parallel": {"sequence_parallel": True}}, r"parallel.sequence_parallel needs Transformer Engine"),
    ({"data": {"inputs": ["no/such/file.txt"]}}, r"data.inputs: file no/such/file.txt does not exist"),
    ({"data": {"tokenizer_model": "missing.model"}}, r"data.tokenizer_model: file missing.model does not exist"),
    ({"data": {"data_prefix": "nowhere/corpus", "tokenizer_model": None}}, r"data.data_prefix: nowhere/corpus.bin does not exist"),
    ({"data": {"split": "90,10"}}, r"data.split must be three weights"),
    ({"data": {"split": "90,1e-3,0"}}, r"data.split: "),
    ({"data": {"vocab_size": 100}}, r"data.vocab_size must be >= 259 for a new tokenizer, got 100"),
    ({"model": {"ffn_hidden_size": 771}, "parallel": {"tensor_model_parallel_size": 2}, "_world": 2},
     r"model.ffn_hidden_size 771 is not divisible by parallel.tensor_model_parallel_size 2"),
    ({"optimizer": {"lr_schedule": "wsd", "warmup_fraction": 0.5, "wsd_decay_fraction": 0.6}},
     r"optimizer.warmup_fraction \+ optimizer.wsd_decay_fraction must be <= 1"),
    ({"teacher": {"mode": "big"}}, r"teacher.mode: 'big' is not one of \('none', 'online', 'offline'\)"),
    ({"teacher": {"mode": "online"}}, r"teacher.checkpoint is required for teacher.mode=online"),
    ({"teacher": {"mode": "online", "checkpoint": "no/such/dir"}}, r"teacher.checkpoint: no/such/dir does not exist"),
    ({"teacher": {"mode": "offline", "store": "x"}}, r"teacher.mode=offline needs the offline logits store"),
    ({"optimizer": {"lr": -1e-3}}, r"optimizer.lr must be > 0, got -0.001"),
    ({"optimizer": {"lr": 1e-3, "min_lr": 1e-2}}, r"optimizer.min_lr 0.01 exceeds optimizer.lr 0.001"),
    ({"optimizer": {"lr_schedule": "step"}}, r"optimizer.lr_schedule: 'step' is not one of"),
    ({"training": {"train_steps": 0}}, r"training.train_steps must be > 0, got 0"),
    ({"model": {"hidden_dropout": 1.0}}, r"model.hidden_dropout must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize("data, message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_config_names_the_key(data, message, monkeypatch):
    data = dict(data)
    monkeypatch.setenv("WORLD_SIZE", str(data.pop("_world", 1)))
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_yaml_file_overrides_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "kd": {"temperature": 1.5}, "parallel": {"tensor_model_parallel_size": 2}}))
    cfg = load_config(path, ["kd.temperature=2.0", "kd.alpha.kind=wsd", "data.micro_batch_size=8"])
    assert cfg.name == "x" and cfg.kd.temperature == 2.0 and cfg.kd.alpha.kind == "wsd"
    assert cfg.data.micro_batch_size == 8 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer == RunConfig().optimizer  # untouched sections keep their defaults


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override 'kd.temperature' is not of the form section.key=value"):
        load_config(None, ["kd.temperature"])


def test_explain_documents_every_key():
    text = explain()
    for key in ("model.num_layers", "teacher.checkpoint", "kd.alpha.n_kd", "optimizer.lr_schedule", "data.split",
                "checkpoint.resume", "parallel.use_distributed_optimizer"):
        assert key in text
    assert "Choices: none, online, offline." in text
    md = explain(markdown=True)
    assert "| `kd.temperature` | `1.0` | τ > 0 dividing both the student's and the teacher's logits. |" in md


def test_defaults_validate():
    validate(RunConfig(), world_size=1)


def test_readme_config_reference_is_generated_from_the_dataclasses():
    from pathlib import Path

    from megadistill.readme import render

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render(readme) == readme, "run `make config-reference`"
