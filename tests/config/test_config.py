"""Run configs: YAML + overrides into dataclasses, and invalid configs rejected with a clear message
naming the key, before any process group exists."""

from __future__ import annotations

import pytest
import yaml

from megadistill.preflight import preflight
from megadistill.config import ConfigError, RunConfig, config_from_dict, explain, load_config, validate
from tiny_runs import ROOT

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
    ({"data": {"data_prefix": "nowhere/corpus", "tokenizer_model": "nowhere/corpus.model"}},
     r"data.data_prefix: nowhere/corpus.bin does not exist"),
    ({"data": {"data_prefix": "nowhere/corpus", "tokenizer_model": None}},
     r"data.data_prefix needs data.tokenizer_model \(the tokenizer the data was made with\)"),
    ({"data": {"global_batch_size": 10, "micro_batch_size": 4}, "_world": None},
     r"data.global_batch_size 10 is not divisible by data.micro_batch_size 4 \(at any data-parallel size\)"),
    ({"optimizer": {"backend": "deepspeed"}, "parallel": {"pipeline_model_parallel_size": 2}, "model": {"num_layers": 4}, "_world": 2},
     r"optimizer.backend=deepspeed does not support pipeline parallelism \(parallel.pipeline_model_parallel_size=2\)"),
    ({"optimizer": {"backend": "torch"}}, r"optimizer.backend: 'torch' is not one of \('megatron', 'deepspeed'\)"),
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
    ({"teacher": {"mode": "offline"}}, r"teacher.store is required for teacher.mode=offline"),
    ({"teacher": {"mode": "offline", "store": "x"}}, r"teacher.store: logits store x does not exist"),
    ({"optimizer": {"lr": -1e-3}}, r"optimizer.lr must be > 0, got -0.001"),
    ({"optimizer": {"lr": 1e-3, "min_lr": 1e-2}}, r"optimizer.min_lr 0.01 exceeds optimizer.lr 0.001"),
    ({"optimizer": {"lr_schedule": "step"}}, r"optimizer.lr_schedule: 'step' is not one of"),
    ({"training": {"train_steps": 0}}, r"training.train_steps must be > 0, got 0"),
    ({"model": {"hidden_dropout": 1.0}}, r"model.hidden_dropout must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize("data, message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_config_names_the_key(data, message):
    data = dict(data)
    world = data.pop("_world", 1)
    with pytest.raises(ConfigError, match=message):
        preflight(config_from_dict(data, world_size=world))  # the schema, then what needs the run's files


def test_yaml_file_overrides_and_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "kd": {"temperature": 1.5}, "parallel": {"tensor_model_parallel_size": 2}}))
    cfg = load_config(path, ["kd.temperature=2.0", "kd.alpha.kind=wsd", "data.micro_batch_size=8"], world_size=2)
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
    from megadistill.cli.readme import render

    readme = (ROOT / "README.md").read_text()
    assert render(readme) == readme, "run `make config-reference`"


# --------------------------------------------------------------------------- schema vs world size


def test_world_size_unknown_skips_only_what_depends_on_it():
    tp2 = config_from_dict({"parallel": {"tensor_model_parallel_size": 2}}, world_size=None)
    validate(tp2)  # not run under a launcher: not rejected for want of ranks
    with pytest.raises(ConfigError, match="world size 1 is not divisible by"):
        validate(tp2, world_size=1)
    with pytest.raises(ConfigError, match=r"world size must be a positive integer, got 0"):
        validate(tp2, world_size=0)


def test_accepted_world_sizes():
    from megadistill.config import accepted_world_sizes

    cfg = config_from_dict({"parallel": {"tensor_model_parallel_size": 2}, "data": {"global_batch_size": 16, "micro_batch_size": 4}})
    assert accepted_world_sizes(cfg) == [2, 4, 8]
    for world in accepted_world_sizes(cfg):
        validate(cfg, world_size=world)
    assert accepted_world_sizes(RunConfig()) == [1]  # 16 / 16: one micro-batch, DP 1 only


def test_deepspeed_backend_validation_runs_its_pass_through_check():
    ds = {"optimizer": {"backend": "deepspeed"}, "parallel": {"use_distributed_optimizer": True},
          "data": {"micro_batch_size": 4, "global_batch_size": 16}}
    config_from_dict(ds, world_size=4)  # use_distributed_optimizer is ignored, not refused
    bad = {**ds, "deepspeed": {"config": {"gradient_accumulation_steps": 2}}}
    config_from_dict(bad, world_size=None)  # unknown DP size: compared at launch
    with pytest.raises(ConfigError, match=r"deepspeed.config.gradient_accumulation_steps=2 contradicts"):
        config_from_dict(bad, world_size=4)  # DP 4: 16 / (4 x 4) = 1
    with pytest.raises(ConfigError, match="deepspeed.config.scheduler is not allowed"):
        config_from_dict({**ds, "deepspeed": {"config": {"scheduler": {"type": "WarmupLR"}}}})


# --------------------------------------------------------------------------- megadistill config --world-size


@pytest.fixture
def no_launcher(monkeypatch):
    """A shell outside torchrun and SLURM, whatever the test runner's environment."""
    from megadistill.launch import TORCHRUN_MARKERS

    for k in list(__import__("os").environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k in TORCHRUN_MARKERS:
            monkeypatch.delenv(k)


def _config_cli(capsys, tmp_path, data, *args):
    from megadistill.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["config", str(path), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


TP2 = {"parallel": {"tensor_model_parallel_size": 2}, "data": {"global_batch_size": 16, "micro_batch_size": 4}}


@pytest.mark.parametrize("args, dp", [(["--world-size", "2"], 1), (["--world-size", "4"], 2),
                                      (["--nproc-per-node", "4", "--nnodes", "2"], 4), (["--nproc-per-node", "2"], 1)])
def test_config_accepts_a_layout_for_a_world_size(capsys, tmp_path, no_launcher, args, dp):
    code, out, err = _config_cli(capsys, tmp_path, TP2, *args)
    assert code == 0, err
    assert yaml.safe_load(out)["parallel"]["tensor_model_parallel_size"] == 2  # still a loadable run file
    assert f"= TP 2 x PP 1 x DP {dp}: valid" in out


def test_config_rejects_a_world_size_the_layout_cannot_use(capsys, tmp_path, no_launcher):
    code, out, err = _config_cli(capsys, tmp_path, TP2, "--world-size", "3")
    assert code == 2 and out == ""
    assert ("world size 3 is not divisible by parallel.tensor_model_parallel_size x "
            "parallel.pipeline_model_parallel_size = 2 x 1 = 2 (world sizes this layout accepts: 2, 4, 8)") in err
    # TP 2 x DP 8 needs 8 x 4 = 32 sequences per step, but the global batch is 16.
    code, _, err = _config_cli(capsys, tmp_path, TP2, "--world-size", "16")
    assert code == 2
    assert "data.global_batch_size 16 is not divisible by data.micro_batch_size 4 x data-parallel size 8 (world sizes" in err


def test_config_without_a_world_size_lists_the_accepted_ones(capsys, tmp_path, no_launcher):
    code, out, err = _config_cli(capsys, tmp_path, TP2)
    assert code == 0, err
    assert "world size unknown (not under a launcher)" in out
    assert "TP 2 x PP 1 = 2 ranks per model copy; world sizes accepted" in out and ": 2, 4, 8\n" in out
    assert yaml.safe_load(out)["data"]["global_batch_size"] == 16


def test_config_under_a_launcher_checks_its_world_size(capsys, tmp_path, no_launcher, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(k, v)
    code, _, err = _config_cli(capsys, tmp_path, TP2)
    assert code == 2 and "world size 3 is not divisible" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out, err = _config_cli(capsys, tmp_path, TP2)
    assert code == 0 and "world size 4 (from the torchrun environment) = TP 2 x PP 1 x DP 2: valid" in out


def test_config_in_an_allocation_without_srun_still_checks_the_schema(capsys, tmp_path, no_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    code, out, err = _config_cli(capsys, tmp_path, TP2)
    assert code == 0, err
    assert "world size unknown (not a launch here (inside a SLURM allocation of 4 tasks" in out


def test_config_schema_only_skips_the_files(capsys, tmp_path, no_launcher):
    data = {**TP2, "data": {**TP2["data"], "inputs": ["/cluster/only/a.txt"]}}
    code, _, err = _config_cli(capsys, tmp_path, data, "--world-size", "2")
    assert code == 2 and "data.inputs: file /cluster/only/a.txt does not exist" in err
    code, out, err = _config_cli(capsys, tmp_path, data, "--world-size", "2", "--schema-only")
    assert code == 0, err
    assert "--schema-only: data files, tokenizer and teacher checkpoint not checked" in out


def test_config_world_size_arguments_are_checked(capsys, tmp_path, no_launcher):
    code, _, err = _config_cli(capsys, tmp_path, TP2, "--world-size", "2", "--nproc-per-node", "2")
    assert code == 2 and "give either --world-size or --nproc-per-node" in err
    code, _, err = _config_cli(capsys, tmp_path, TP2, "--nnodes", "2")
    assert code == 2 and "--nnodes needs --nproc-per-node" in err
    with pytest.raises(SystemExit):
        _config_cli(capsys, tmp_path, TP2, "--world-size", "0")
    assert "expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=.inf", "optimizer.lr: expected a finite number, got inf"),
        ("optimizer.lr=.nan", "optimizer.lr: expected a finite number, got nan"),
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay: expected a finite number"),
        ("model.init_method_std=.nan", "model.init_method_std: expected a finite number"),
        ("optimizer.clip_grad=.nan", "optimizer.clip_grad: expected a finite number"),
        ("kd.alpha.alpha_max=.nan", "kd.alpha.alpha_max: expected a finite number"),
        ("training.seed=-1", "training.seed must be in [0, 2**31 - 1000), got -1"),
        ("=2", "override '=2': '' is not a dotted key such as kd.temperature"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_rejected(override, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [override])
    assert message in str(e.value)


def test_exponent_floats_are_numbers_in_yaml_and_overrides():
    # PyYAML (YAML 1.1) reads 1e-3 as a string; it means 0.001 to every user.
    cfg = config_from_dict({"optimizer": {"lr": "5E-3"}}, ["optimizer.min_lr=1e-4"])
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (5e-3, 1e-4)
    with pytest.raises(ConfigError, match="optimizer.lr: expected a number, got 'fast'"):
        config_from_dict({"optimizer": {"lr": "fast"}})


def test_a_config_built_in_code_is_checked_for_finite_numbers_too():
    cfg = RunConfig()
    cfg.kd.temperature = float("nan")
    with pytest.raises(ConfigError, match="kd.temperature: expected a finite number"):
        validate(cfg, world_size=1)


def test_overrides_may_follow_flags(tmp_path, capsys):
    from megadistill.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("kd: {temperature: 1.5}\n")
    assert main(["config", str(path), "--schema-only", "kd.temperature=2.5", "optimizer.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "temperature: 2.5" in out and "lr: 0.001" in out
    with pytest.raises(SystemExit):
        main(["config", str(path), "--schema-only", "--no-such-flag"])


def test_the_tokenizer_block_is_the_flat_keys():
    from megadistill.config import ConfigError, config_from_dict

    given = {"data": {"tokenizer": {"type": "huggingface", "path": "/t/tokenizer.json"}}}
    cfg = config_from_dict(given)
    assert (cfg.data.tokenizer_type, cfg.data.tokenizer_model) == ("huggingface", "/t/tokenizer.json")
    assert given == {"data": {"tokenizer": {"type": "huggingface", "path": "/t/tokenizer.json"}}}
    cfg = config_from_dict({}, ["data.tokenizer.path=/t/m.model"])
    assert (cfg.data.tokenizer_type, cfg.data.tokenizer_model) == ("sentencepiece", "/t/m.model")
    with pytest.raises(ConfigError, match="data.tokenizer.path and data.tokenizer_model say the same thing"):
        config_from_dict({"data": {"tokenizer": {"path": "a"}, "tokenizer_model": "b"}})
    with pytest.raises(ConfigError, match="data.tokenizer must be a mapping with keys type and path"):
        config_from_dict({"data": {"tokenizer": {"kind": "x"}}})


# --------------------------------------------------------------------------- warnings

SALT_BEYOND_THE_RUN = {"teacher": {"mode": "online", "checkpoint": "/t"}, "training": {"train_steps": 10},
                       "kd": {"alpha": {"kind": "salt", "alpha_max": 0.9, "n_kd": 11}}}
N_KD_WARNING = (r"kd.alpha.n_kd 11 is larger than training.train_steps 10: KD \(alpha kd.alpha.alpha_max=0.9\) lasts the "
                r"whole run and SALT never switches to plain LM training")


def _config_warnings(data, monkeypatch, **env) -> list[str]:
    import warnings

    from megadistill.config.validate import ConfigWarning
    from megadistill.launch import TORCHRUN_MARKERS

    for k in list(__import__("os").environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k in TORCHRUN_MARKERS:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config_from_dict(data)
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def test_a_salt_kd_phase_longer_than_the_run_is_a_warning_naming_both_keys(monkeypatch):
    import re

    said = _config_warnings(SALT_BEYOND_THE_RUN, monkeypatch)
    assert len(said) == 1 and re.match(N_KD_WARNING, said[0]), said
    # n_kd <= train_steps: the switch happens (at the run's end at the latest); no teacher: no KD at all.
    kd = SALT_BEYOND_THE_RUN["kd"]["alpha"]
    for data in ({**SALT_BEYOND_THE_RUN, "kd": {"alpha": {**kd, "n_kd": 10}}},
                 {**SALT_BEYOND_THE_RUN, "kd": {"alpha": {**kd, "n_kd": 3}}},
                 {**SALT_BEYOND_THE_RUN, "teacher": {"mode": "none"}}):
        assert _config_warnings(data, monkeypatch) == [], data
    # Every rank validates the config; only the first says it.
    torchrun = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert _config_warnings(SALT_BEYOND_THE_RUN, monkeypatch, RANK="1", **torchrun) == []
    assert len(_config_warnings(SALT_BEYOND_THE_RUN, monkeypatch, RANK="0", **torchrun)) == 1


def test_megadistill_config_says_the_warning_once(tmp_path):
    """On stderr once, however often the process validates the config (``megadistill train`` does it
    twice: loading the run file and starting the process groups)."""
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(SALT_BEYOND_THE_RUN))
    code = ("import sys; from megadistill.cli import main; from megadistill.config import load_config; "
            f"code = main(['config', {str(path)!r}, '--schema-only']); load_config({str(path)!r}); sys.exit(code)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("kd.alpha.n_kd 11 is larger than training.train_steps 10") == 1, r.stderr


def test_list_of_numbers_keys_are_read_as_numbers():
    # record_logits.temperatures is a list[float]: YAML numbers (and YAML 1.1's "2e0" strings) become
    # floats, whatever is not a number is refused naming the element (lists of names stay strings).
    cfg = config_from_dict({"record_logits": {"store": "/s", "temperatures": [1, "2e0", 0.5]}})
    assert cfg.record_logits.temperatures == [1.0, 2.0, 0.5]
    assert all(isinstance(t, float) for t in cfg.record_logits.temperatures)
    with pytest.raises(ConfigError, match=r"^record_logits.temperatures\[1\]: expected a number, got 'two'"):
        config_from_dict({"record_logits": {"store": "/s", "temperatures": [1, "two"]}})
    assert config_from_dict({"checkpoint": {"stop_signals": ["SIGTERM"]}}).checkpoint.stop_signals == ["SIGTERM"]
